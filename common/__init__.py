"""Training infrastructure every trainer shares, written once.

Import the submodules directly (this package imports nothing heavy on its own):

  common.train_state build_train_state (mesh -> rules -> placed params/frozen -> sharded optimizer state)
  common.loop        run_train_loop (the step loop of RM, SFT and PPO, LoopHooks), start_run, open_checkpoints
  common.workdir     model_config.json, tokenizer/, restore_params (params + frozen), write_json / JSONL
  common.data_io     read_table, bad rows (RowIssue, BadRowError), load_tokenizer, stepped_batches
  common.checkpoint  CheckpointManager (Orbax: 'state' pytree + 'extra' JSON dict)
  common.metrics     MetricsWriter (workdir/metrics.jsonl), write_config_json, Progress
  common.optim       make_schedule, make_optimizer (AdamW + masks), optimizer_from_config, accumulate_gradients
  common.mesh        make_mesh, batch_sharding, shard_batch, replicated
  common.run_utils   PreemptionHandler (SIGTERM), check_finite
  common.distributed initialize (jax.distributed from config/env), is_main_process, gather_to_host
"""
