"""Pass-through options: real Beam options pass, misspellings are refused (issue 15, finding 6)."""

import json

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from sourcebeam.pipelines.pass_through import (
    beam_option_strings, check_pass_through, suggest, unknown_option_names)
from tests.test_publish import as_line
from tests.cli import run_cli
from tests.test_validation import good


def run_main(capsys, *argv):
  return run_cli(*argv)


@pytest.fixture
def raw(tmp_path):
  path = tmp_path / 'raw.jsonl'
  path.write_bytes(b'\n'.join(as_line(good(event_id=f'e{i}', sequence=i)) for i in (1, 2)) + b'\n')
  return path


@pytest.mark.cli
def test_publish_archive_formt_is_refused_not_avro(tmp_path, raw, capsys):
  """`publish --archive-formt parquet` wrote Avro, exit 0."""
  code, _, err = run_main(capsys, 'publish', '--input', str(raw), '--out', str(tmp_path / 'o'),
                          '--archive', str(tmp_path / 'a'), '--archive-formt', 'parquet')
  assert code == 2
  assert err.strip().splitlines() == [
      'error: unknown option --archive-formt for run.py publish: did you mean --archive-format? '
      '(see run.py publish --help)']
  assert not (tmp_path / 'o').exists() and not (tmp_path / 'a').exists()  # nothing ran


@pytest.mark.cli
def test_replay_runnr_is_refused_not_run_on_the_direct_runner(tmp_path, capsys):
  """`replay --runnr=PrismRunner` ran on the DirectRunner, exit 0."""
  code, _, err = run_main(capsys, 'replay', '--archive', str(tmp_path / 'a'),
                          '--out', str(tmp_path / 'o'), '--runnr=PrismRunner')
  assert code == 2
  assert err.strip().splitlines() == [
      'error: unknown option --runnr for run.py replay: did you mean --runner, a Beam pipeline '
      'option? (see run.py replay --help)']


@pytest.mark.cli
def test_keys_tpo_is_refused_not_ignored(tmp_path, capsys):
  """`keys --tpo 5` was ignored without a word."""
  code, _, err = run_main(capsys, 'keys', '--archive', str(tmp_path / 'a'), '--tpo', '5')
  assert code == 2
  assert 'error: unknown option --tpo for run.py keys: did you mean --top?' in err


@pytest.mark.cli
@pytest.mark.parametrize('argv, meant', [
    (['publish', '--input', 'x', '--out', 'y', '--archive_format', 'parquet'], '--archive-format'),
    (['replay', '--archive', 'x', '--out', 'y', '--flink-master=[local]'], '--flink_master'),
    (['--runer', 'FlinkRunner'], '--runner'),  # the main job
    (['services', 'up', '--kafka-prot', '9'], '--kafka-port'),
    (['generate', '--evnts', '5', '--out', 'x'], '--events'),
])
def test_misspellings_everywhere_are_exit_2_with_a_suggestion(argv, meant, capsys):
  code, _, err = run_main(capsys, *argv)
  assert code == 2
  assert f'did you mean {meant}' in err and len(err.strip().splitlines()) == 1


@pytest.mark.cli
def test_commands_without_beam_options_still_refuse_any_unknown_option(capsys):
  code, _, err = run_main(capsys, 'services', 'status', '--zzzzzzzz')
  assert code == 2 and 'unknown arguments for services: --zzzzzzzz' in err


@pytest.mark.cli
def test_real_beam_options_pass_through(tmp_path, raw, capsys):
  code, _, err = run_main(capsys, 'publish', '--input', str(raw), '--out', str(tmp_path / 'o'),
                          '--direct_num_workers=1', '--direct_running_mode', 'in_memory',
                          '--experiments=beam_fn_api', '--no_pipeline_type_check')
  assert code == 0, err
  assert 'warning' not in err and 'did you mean' not in err
  assert json.loads((tmp_path / 'o' / 'summary.json').read_text())['published'] == 2


def test_beam_option_names_come_from_beam_itself():
  """Every option Beam's own parser knows (all PipelineOptions subclasses) is in the list."""
  names = beam_option_strings()
  parsers = []
  PipelineOptions([]).get_all_options(add_extra_args_fn=parsers.append)  # Beam's own parser
  beams_own = {s for a in parsers[0]._actions for s in a.option_strings} - {'-h', '--help'}
  assert len(beams_own) > 100 and names >= beams_own
  for option in ('--runner', '--flink_master', '--prism_location', '--s3_endpoint_url',
                 '--dry_run', '--no_use_public_ips', '--environment_type', '--parallelism'):
    assert option in names


def test_unknown_options_that_look_like_nothing_pass_with_a_warning():
  warnings = []
  check_pass_through(['--runner=DirectRunner', '--checkpointing_mode_x9', 'v'], ['--out'],
                     'replay', warn=warnings.append)
  assert warnings == ['warning: --checkpointing_mode_x9 is neither an option of run.py replay '
                      'nor a Beam pipeline option; it goes to the runner unchecked']
  assert unknown_option_names(['--a=1', 'v', '-5', '-', '--', '--after']) == ['--a']
  assert suggest('--tpo', ['--top', '--json'], []) == '--top'
  assert suggest('--zzz', ['--top'], ['--runner']) is None
