"""Keeps README.md and docs/*.md honest: commands parse, short ones run.

The pages are read in `PAGES` order: README.md first (the quickstart
trains `runs/quickstart`), then the docs pages whose commands use that run,
then any other docs page by name. Every `python main.py` command of every
page must name a config that loads and override only keys that exist. The
commands of their code blocks that need no downloaded data (the quickstart,
evaluation, tools, `python -c` snippets) run in that order in one scratch
directory, with tiny training settings appended: the first as a subprocess,
the others in the test's process. Their ```python snippets run as they are.
"""

import importlib.util
import os
import pathlib
import re
import runpy
import shlex
import subprocess
import sys
import textwrap
import warnings

import helpers
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# README.md, then the pages whose commands build on each other in this
# order (the quickstart run, then what reads it); then the rest by name.
ORDER = [
  'README.md',
  'docs/data.md',
  'docs/training.md',
  'docs/multihost_training.md',
  'docs/inference.md',
  'docs/section4.md',
  'docs/benchmarks.md',
  'docs/gpu_tpu.md',
]
PAGES = ORDER + sorted(
  f'docs/{path.name}'
  for path in (ROOT / 'docs').glob('*.md')
  if f'docs/{path.name}' not in ORDER
)
TEXTS = {page: (ROOT / page).read_text() for page in PAGES}
# Appended to the pages' main.py commands: a tiny model and a few steps
# (3: one evaluation and one checkpoint, and room for the snapshot run's
# 3 cycles).
TINY_MODEL = ['--config.model=gunn_tiny']
TINY_TRAINING = [
  '--config.num_train_steps=3',
  '--config.eval_every_steps=3',
  '--config.checkpoint_every_steps=3',
  '--config.log_every_steps=1',
]


def block_commands(pages=PAGES):
  """Commands of the pages' indented code blocks, `python -c` ones whole."""
  return [c for page in pages for c in _block_commands(TEXTS[page])]


def _block_commands(text):
  commands, lines = [], text.splitlines()
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


def main_commands(pages=PAGES):
  """Every `python main.py ...` command, in code blocks or in backticks."""
  inline = [
    c
    for page in pages
    for c in re.findall(r'`(python main\.py [^`]+)`', TEXTS[page])
  ]
  blocks = [c for c in block_commands(pages) if c.startswith('python main.py')]
  return inline + blocks


def load_config(argument):
  path, _, arg = argument.partition(':')
  spec = importlib.util.spec_from_file_location('readme_config', ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def test_ci_runs_the_readme_test_command():
  ci = (ROOT / '.ci' / 'run').read_text().splitlines()
  command = next(line for line in ci if line.startswith('python -m pytest'))
  assert f'&& {command}\n' in TEXTS['README.md']


def test_readme_has_the_commands_we_document():
  for page in ORDER:
    assert (ROOT / page).exists(), page
  # README: the quickstart, the test command and the paper's experiments.
  readme = main_commands(['README.md'])
  assert any('configs/quickstart.py' in c for c in readme)
  assert len(readme) >= 15
  assert any('configs/imagenet.py:wide_gunn18' in c for c in readme)
  # The docs pages: evaluation, fine-tuning, multi-host and the tools.
  docs = main_commands(PAGES[1:])
  assert len(docs) >= 8
  assert any('--mode=eval' in c for c in docs)
  assert any('--coordinator_address=' in c for c in docs)
  tools = [
    c
    for c in block_commands(PAGES[1:])
    if c.startswith('python -m gunn_jax.tools')
  ]
  assert {c.split()[3] for c in tools} >= {
    'classify',
    'features',
    'ensemble',
    'singularities',
  }


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


def run_in_this_process(argv: list[str]) -> int:
  """Runs `python ARGV...` as Python would, in this process; returns the
  exit status. main.py through `helpers.run_main` (absl's flags are
  defined once per process), `-m MODULE` through runpy, `-c PROGRAM`
  through exec."""
  if argv[0] == 'main.py':
    return helpers.run_main(*argv[1:])
  if argv[0] == '-c':
    exec(compile(argv[1], '<string>', 'exec'), {'__name__': '__main__'})
    return 0
  assert argv[0] == '-m', argv
  saved_argv, sys.argv = sys.argv, argv[1:]
  try:
    with warnings.catch_warnings():
      # Other tests imported the module already; runpy runs a fresh copy.
      warnings.filterwarnings('ignore', '.* found in sys.modules', Warning)
      runpy.run_module(argv[1], run_name='__main__', alter_sys=True)
  except SystemExit as e:
    return e.code or 0
  finally:
    sys.argv = saved_argv
  return 0


@pytest.mark.slow
def test_short_commands_run_in_order(tmp_path, monkeypatch):
  """The first command (the quickstart's training) runs as a subprocess,
  exactly as typed; the others in this process, which has TensorFlow and
  JAX loaded already (each subprocess spent about 16 of its 20 s importing
  them on 2 cores)."""
  for name in ('main.py', 'configs', 'gunn_jax'):
    (tmp_path / name).symlink_to(ROOT / name)
  (tmp_path / 'runs').mkdir()
  monkeypatch.chdir(tmp_path)
  commands = [c for c in block_commands() if runnable(c)]
  assert len(commands) >= 15
  assert 'configs/quickstart.py' in commands[0]
  for index, command in enumerate(commands):
    if command.startswith('python -c'):
      # What bash makes of the double-quoted program: \" becomes ".
      program = command[len('python -c "') : -1].replace('\\"', '"')
      argv = ['-c', program]
    else:
      argv = shlex.split(command)[1:]
    if '--mode=eval' in command:
      pass  # The run's saved config has the tiny settings.
    elif command.startswith('python main.py'):
      argv += TINY_MODEL + TINY_TRAINING
    if index == 0:
      result = subprocess.run(
        [sys.executable, *argv],
        cwd=tmp_path,
        # Compiled as the tests' own programs are (tests/conftest.py).
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=helpers.TIMEOUT_S,
      )
      assert result.returncode == 0, f'{command}\n{result.stderr[-3000:]}'
    else:
      assert run_in_this_process(argv) == 0, command
  assert (tmp_path / 'runs' / 'features.npy').exists()
  assert (tmp_path / 'runs' / 'quickstart' / 'singularities.png').exists()
  assert (tmp_path / 'runs' / 'gunn_vs_sunn.png').exists()
  assert (tmp_path / 'runs' / 'quickstart' / 'metrics.jsonl').exists()


def python_snippets():
  """The fenced ```python blocks of every page, dedented, by page."""
  return {
    f'{page}:{index}': textwrap.dedent(block)
    for page in PAGES
    for index, block in enumerate(
      re.findall(r'^ *```python\n(.*?)^ *```', TEXTS[page], re.S | re.M)
    )
  }


@pytest.mark.parametrize(
  'snippet', python_snippets().values(), ids=python_snippets().keys()
)
def test_python_snippets_run(snippet):
  result = subprocess.run(
    [sys.executable, '-c', snippet],
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=helpers.TIMEOUT_S,
  )
  assert result.returncode == 0, result.stderr[-3000:]


def test_there_are_python_snippets():
  assert python_snippets()
