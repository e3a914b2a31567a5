"""Training infrastructure every trainer shares, written once.

Import the submodules directly (this package imports nothing heavy on its own):

  common.checkpoint  CheckpointManager (Orbax: 'state' pytree + 'extra' JSON dict)
  common.metrics     MetricsWriter (workdir/metrics.jsonl), write_config_json, Progress
  common.optim       make_schedule, make_optimizer (AdamW + masks), accumulate_gradients
  common.mesh        make_mesh, batch_sharding, shard_batch, replicated
  common.run_utils   PreemptionHandler (SIGTERM), check_finite
  common.loop        run_train_loop (the RM/SFT step loop), open_checkpoints (resume), write_json
  common.distributed initialize (jax.distributed from config/env), is_main_process, gather_to_host
"""
