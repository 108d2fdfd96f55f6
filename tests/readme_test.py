"""Keeps README.md honest: its commands parse, and the short ones run.

Every `python main.py` command in the README must name a config that loads
and override only keys that exist. The commands of its code blocks that need
no downloaded data (the quickstart, evaluation, tools, `python -c` snippets)
run in order in a scratch directory, with tiny training settings appended.
Its ```python snippets run as they are.
"""

import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / 'README.md').read_text()
# Appended to the README's main.py commands: a tiny model and a few steps.
TINY_MODEL = ['--config.model=gunn_tiny']
TINY_TRAINING = [
  '--config.num_train_steps=6',
  '--config.eval_every_steps=3',
  '--config.checkpoint_every_steps=3',
  '--config.log_every_steps=1',
]


def block_commands():
  """Commands of the indented code blocks, `python -c` ones kept whole."""
  commands, lines = [], README.splitlines()
  index = 0
  while index < len(lines):
    line = lines[index]
    if line.startswith('    ') and 'python ' in line:
      # The part after `&&` (install steps, `cd` inside quoted remote runs).
      command = line.strip().split('&& ')[-1]
      if not command.startswith('python -c "'):
        command = command.removesuffix('"')
      else:
        while not lines[index].strip() == '"':
          index += 1
          command += '\n' + lines[index][4:]
      commands.append(command)
    index += 1
  return [c for c in commands if c.startswith('python ')]


def main_commands():
  """Every `python main.py ...` command, in code blocks or in backticks."""
  inline = re.findall(r'`(python main\.py [^`]+)`', README)
  blocks = [c for c in block_commands() if c.startswith('python main.py')]
  return inline + blocks


def load_config(argument):
  path, _, arg = argument.partition(':')
  spec = importlib.util.spec_from_file_location('readme_config', ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def test_readme_has_the_commands_we_document():
  commands = main_commands()
  assert len(commands) >= 20
  assert any('configs/imagenet.py:wide_gunn18' in c for c in commands)
  assert any(c.startswith('python -m gunn_jax.tools') for c in block_commands())


@pytest.mark.parametrize('command', sorted(set(main_commands())))
def test_main_commands_parse(command):
  flags = dict(
    arg.lstrip('-').split('=', 1) for arg in shlex.split(command)[2:]
  )
  mode = flags.pop('mode', 'train')
  assert mode in ('train', 'eval')
  # Evaluation reads the run's saved config: --config only for overrides.
  config = load_config(flags.pop('config', None) or 'configs/base.py')
  assert flags.pop('workdir')
  assert flags.pop('checkpoint', 'latest') in ('latest', 'best')
  for multi_host_flag in ('coordinator_address', 'num_processes', 'process_id'):
    flags.pop(multi_host_flag, None)
  for key in flags:
    assert key.startswith('config.'), command
    assert key.removeprefix('config.') in config, command


def runnable(command):
  if command.startswith('python main.py'):
    return 'configs/quickstart.py' in command or '--mode=eval' in command
  return command.startswith(('python -c', 'python -m gunn_jax.tools'))


@pytest.mark.slow
def test_short_commands_run_in_order(tmp_path):
  for name in ('main.py', 'configs', 'gunn_jax'):
    (tmp_path / name).symlink_to(ROOT / name)
  (tmp_path / 'runs').mkdir()
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  commands = [c for c in block_commands() if runnable(c)]
  assert len(commands) >= 10
  for command in commands:
    if command.startswith('python -c'):
      # What bash makes of the double-quoted program: \" becomes ".
      program = command[len('python -c "') : -1].replace('\\"', '"')
      argv = [sys.executable, '-c', program]
    else:
      argv = [sys.executable, *shlex.split(command)[1:]]
    if '--mode=eval' in command:
      pass  # The run's saved config has the tiny settings.
    elif command.startswith('python main.py'):
      argv += TINY_MODEL + TINY_TRAINING
    result = subprocess.run(
      argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f'{command}\n{result.stderr[-3000:]}'
  assert (tmp_path / 'runs' / 'features.npy').exists()
  assert (tmp_path / 'runs' / 'quickstart' / 'singularities.png').exists()
  assert (tmp_path / 'runs' / 'gunn_vs_sunn.png').exists()
  assert (tmp_path / 'runs' / 'quickstart' / 'metrics.jsonl').exists()


def python_snippets():
  """The fenced ```python blocks, dedented."""
  return [
    textwrap.dedent(block)
    for block in re.findall(r'^ *```python\n(.*?)^ *```', README, re.S | re.M)
  ]


@pytest.mark.parametrize('snippet', python_snippets())
def test_python_snippets_run(snippet):
  result = subprocess.run(
    [sys.executable, '-c', snippet],
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]


def test_there_are_python_snippets():
  assert python_snippets()
