"""PPO for RLHF: rollouts, losses (GAE, KL estimators, clipped objectives), KL controllers."""
