"""Entry point for every experiment: picks the trainer named by `config.trainer`.

  python -m experiments.run --config configs/rm.py:size=tiny --workdir /tmp/rm \
      --config.optim.learning_rate=1e-5

`config.trainer` is a key of TRAINERS or a dotted module path; the module's
`train(config, workdir)` runs. Overrides must name existing config fields.
Re-running the same command with the same workdir resumes from its checkpoint.
Multi-process runs: start the same command once per process with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID (or config.distributed.*); see common/distributed.py.
"""

import importlib
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from common import distributed

TRAINERS = {
    'rm': 'rm.train',
    'ppo': 'ppo.train',
    'sft': 'sft.train',
    'quickstart': 'experiments.quickstart',
    'overoptimization': 'experiments.overoptimization',
}

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, optionally with an argument: '
    'configs/NAME.py[:ARG].', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run directory: config.json, metrics.jsonl, checkpoints/.')
flags.mark_flags_as_required(['config', 'workdir'])


def trainer_module(trainer: str) -> str:
  """Module path for a TRAINERS key or a dotted path; error lists the known keys."""
  if trainer in TRAINERS:
    return TRAINERS[trainer]
  if isinstance(trainer, str) and '.' in trainer:
    return trainer
  raise ValueError(f'Unknown config.trainer {trainer!r}; known trainers: '
                   f'{sorted(TRAINERS)} (or a dotted module path with a train function).')


def _parse_flags(argv):
  """absl's parsing, with a clear message for unknown `--config.x` overrides."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'FATAL flags error: {e}\nPass --helpshort to see the flags.')
  except (AttributeError, KeyError) as e:  # ml_collections: no such config field.
    keys = re.findall(r"'([^'\"]+)'", str(e))
    overrides = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
    named = [o for o in overrides if keys and keys[-1] in o.split('.')[1:]]
    if not named:
      raise  # Not an override problem: a bug inside the config file itself.
    sys.exit(f'FATAL unknown config key {keys[-1]} in {named}: overrides must name '
             'fields that exist in the config file.')


def main(argv):
  logging.set_verbosity(logging.WARNING)  # Orbax logs every manager at INFO.
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if 'trainer' not in config:
    raise ValueError('The config has no `trainer` field; set it to one of '
                     f'{sorted(TRAINERS)} or a dotted module path.')
  # Before anything touches a device: a multi-process run joins JAX's distributed runtime here.
  distributed.initialize(config)
  module = importlib.import_module(trainer_module(config.trainer))
  if not callable(getattr(module, 'train', None)):
    raise AttributeError(f'{module.__name__} has no train(config, workdir) function.')
  module.train(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
