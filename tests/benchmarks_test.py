"""Tests of the benchmark entry points `run.py` and `profile.py`, tiny model."""

import json
import math

import jax
import pytest

from benchmarks import device_rows, input_pipeline, loop, profile, run
from configs import base
from gunn_jax import train

_TRAIN_FLOATS = (
  'step_ms_median',
  'step_ms_min',
  'step_ms_max',
  'images_per_s',
  'compile_s',
  'flops',
)


@pytest.mark.parametrize(
  'model, variant, network',
  [
    ('gunn15', 'gunn', 'gunn15'),
    ('gunn15', 'gunn_autodiff', 'gunn15'),
    ('gunn15', 'sunn', 'sunn15'),
    ('sunn15', 'gunn', 'gunn15'),
    ('sunn15', 'sunn', 'sunn15'),
    ('wide_gunn18', 'sunn', 'wide_sunn18'),
  ],
)
def test_network_name(model, variant, network):
  assert run.network_name(model, variant) == network


@pytest.mark.parametrize(
  'model, variant', [('gunn15_nores', 'sunn'), ('gunn15', 'gunn_fast')]
)
def test_network_name_errors(model, variant):
  with pytest.raises(ValueError):
    run.network_name(model, variant)


def test_unknown_dtype_exits_with_status_2(capsys):
  with pytest.raises(SystemExit) as exit_info:
    run.main(['--models', 'gunn_tiny', '--dtypes', 'float16'])
  assert exit_info.value.code == 2
  assert "unknown dtypes ['float16']" in capsys.readouterr().err


def test_fullest_step_keeps_the_operations_of_one_step():
  events = [('a', 5, 1), ('b', 12, 3), ('a', 14, 2), ('c', 30, 1)]
  assert profile.fullest_step(events, [(0, 10), (10, 20)]) == [
    ('b', 3),
    ('a', 2),
  ]
  assert profile.fullest_step(events, []) == [
    ('a', 1),
    ('b', 3),
    ('a', 2),
    ('c', 1),
  ]


def test_summarise_by_part_and_operation():
  hlo = '\n'.join(
    [
      '  %fusion.1 = f32[4,8]{1,0} fusion(%p), metadata={op_name='
      '"jit(s)/jvp(GUNNNet)/stage1_gunn/while/body/dot"}',
      '  ROOT %fusion.2 = (f32[], f32[]) fusion(%q), metadata={op_name='
      '"jit(s)/transpose(jvp(GUNNNet))/stem_conv/conv"}',
    ]
  )
  summary = profile.summarise(
    [('fusion.1', 2e6), ('fusion.2', 1e6), ('fusion.1', 2e6), ('x', 1e6)],
    profile.hlo_instructions(hlo),
  )
  assert summary['parts'] == {
    ('stage1_gunn', 'forward'): 4.0,
    ('stem', 'backward'): 1.0,
    ('other', 'forward'): 1.0,
  }
  assert [op[:4] for op in summary['ops']] == [
    ('fusion.1', 2, 4.0, 'f32[4,8]{1,0}'),
    ('fusion.2', 1, 1.0, 'tuple'),
    ('x', 1, 1.0, '?'),
  ]


def test_profile_attributes_time_to_parts_and_operations(capsys):
  result = profile.main(
    ['--model=gunn_tiny', '--image_size=16', '--batch_size=4', '--top=5']
  )
  parts = result['parts']
  for part in ('stem', 'stage1_gunn', 'stage2_gunn', 'stage2_transition'):
    for direction in ('forward', 'backward'):
      assert parts[(part, direction)] > 0, (part, direction)
  total = sum(parts.values())
  assert math.isclose(total, sum(ms for _, _, ms, _, _ in result['ops']))
  # The GUNN layers' scan bodies run once per segment (P = 2 here).
  counts = [count for _, count, _, _, op in result['ops'] if 'gunn' in op]
  assert max(counts) == 2
  printed = capsys.readouterr().out
  assert '| stage1_gunn |' in printed
  assert printed.count('\n| ') >= 5


@pytest.mark.slow
def test_tiny_run_writes_json(tmp_path, capsys):
  path = tmp_path / 'out.json'
  returned = run.main(
    [
      '--models=gunn_tiny',
      '--image_size=16',
      '--batch_size=4',
      '--steps=2',
      '--warmup=1',
      '--input_batches=3',
      '--input_image_size=16',
      f'--json={path}',
    ]
  )
  records = json.loads(path.read_text())
  assert records == returned
  assert [(r['model'], r['variant']) for r in records] == [
    ('gunn_tiny', 'gunn'),
    ('gunn_tiny', 'gunn_autodiff'),
    ('sunn_tiny', 'sunn'),
    ('digits', 'input_pipeline'),
  ]
  for r in records:
    assert r['dtype'] == 'float32'
    assert r['batch_size'] == 4
    assert r['device_kind'] == jax.devices()[0].device_kind
    assert r['platform'] == jax.devices()[0].platform
    assert r['jax_version'] == jax.__version__
    assert isinstance(r['cpu_count'], int) and r['cpu_count'] > 0
    assert isinstance(r['images_per_s'], float) and r['images_per_s'] > 0
    assert math.isfinite(r['images_per_s'])

  *steps, pipeline = records
  for r in steps:
    assert r['image_size'] == 16 and r['steps'] == 2
    for key in _TRAIN_FLOATS:
      assert isinstance(r[key], float), key
      assert math.isfinite(r[key]) and r[key] > 0, key
    assert r['step_ms_min'] <= r['step_ms_median'] <= r['step_ms_max']
    assert r['images_per_s'] == pytest.approx(4000 / r['step_ms_median'])
    assert isinstance(r['temp_bytes'], int) and r['temp_bytes'] > 0
    assert isinstance(r['num_params'], int) and r['num_params'] > 0
    forward = r['forward_flops_per_image']
    assert isinstance(forward, int) and forward > 0
    assert r['model_flops_per_step'] == 3 * 4 * forward
    assert r['achieved_tflops'] == pytest.approx(
      r['model_flops_per_step'] / r['step_ms_median'] / 1e9
    )
    assert r['mfu'] is None  # No peak for CPUs.
    assert (r['conv_gradient'], r['batch_units'], r['scan_unroll']) == (
      'auto',
      'auto',
      1,
    )
  # The variant reaches the model: Algorithm 1 keeps fewer activations.
  gunn, autodiff, _ = steps
  assert gunn['num_params'] == autodiff['num_params']
  assert gunn['temp_bytes'] < autodiff['temp_bytes']
  assert pipeline['image_size'] == 16
  assert pipeline['compile_s'] is None and pipeline['temp_bytes'] is None
  assert pipeline['forward_flops_per_image'] is None

  table = capsys.readouterr().out
  assert '| model | variant | dtype |' in table
  assert '| digits | input_pipeline | float32 | 4 | 16 | - |' in table


def test_imagenet_formats_are_compared_on_the_same_images():
  rows = input_pipeline.compare_imagenet_formats(
    64, batch_size=8, shape=(32, 40), num_batches=2
  )
  assert [row['format'] for row in rows] == ['array_record', 'tfrecord']
  for row in rows:
    assert row.keys() == {
      'format',
      'images/s',
      'images/s per core',
      'first batch at step 0 (s)',
      'first batch at step 7 (s)',
    }
    assert all(v > 0 for k, v in row.items() if k != 'format')


def test_device_throughput_makes_batches_on_the_devices():
  config = base.get_config()
  config.update(dataset='digits', image_size=8, batch_size=8)
  rate = input_pipeline.measure_device_throughput(config, 3, warmup=1)
  assert rate > 0


@pytest.mark.parametrize('placement', ['host', 'device'])
def test_loop_cost_rows_run_on_either_input_path(monkeypatch, placement):
  monkeypatch.setattr(train, 'create_model', loop._linear_model)
  config = loop.loop_config(steps=6, batch_size=16)
  config.input_placement = placement
  assert loop.loop_ms(config) > 0
  assert loop.bare_step_ms(config, 6) > 0
  assert loop.pipeline_ms(config, 6) > 0


def test_loop_leaves_its_warm_up_interval_out(monkeypatch):
  config = loop.loop_config(steps=300, batch_size=64)
  assert config.log_every_steps == 100
  assert config.num_train_steps == 400 and loop.timed_steps(config) == 300
  logged = [
    {'step': 100, 'steps_per_sec': 1.0},  # Compilation and the first steps.
    {'step': 200, 'steps_per_sec': 1000.0},
    {'step': 300, 'steps_per_sec': 2000.0},
    {'step': 400, 'steps_per_sec': 500.0},
  ]
  monkeypatch.setattr(train, 'train_and_evaluate', lambda *args: None)
  monkeypatch.setattr(loop.metric_io, 'read_metrics', lambda *args: logged)
  assert loop.loop_ms(config) == 1.0  # 1000 / the median of 500..2000.


def test_device_check_times_train_and_evaluate_where_it_imports():
  record = device_rows.measure_loop('gunn_tiny', 'float32', 4, 8, 15)
  assert (record['kind'], record['steps']) == ('loop', 15)
  assert record['options'] == {'input_placement': 'device'}
  assert record['images_per_s'] == pytest.approx(4000 / record['step_ms'])
  assert (
    record['model_flops_per_step']
    == 3 * 4 * (record['forward_flops_per_image'])
  )
