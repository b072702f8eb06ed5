"""Process-level tunings of Beam's Python SDK worker, for workers that run in this process.

The local runners (DirectRunner, Prism) and Flink with LOOPBACK workers run a pipeline's
Python steps in the process that launched it, so the process can make Beam's SDK cheaper
where profiles found it spending time the job did not need. Each function here is one such
change: idempotent, measured (its docstring says where and how much), and installed by
:func:`sourcebeam.pipelines.runners.runner_args` for the runners it is meant for (the
frozen startup heap by ``run.py stream`` as a live view pipeline, the batch collection
thresholds by :func:`sourcebeam.pipelines.options.pipeline_args` for bounded pipelines).
README's "Where a write's time goes" and "The whole application at archive speed" have the
measurements.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from typing import Any, Dict, Optional, Tuple


# Runners whose SDK workers may run in this process: see cheap_state_cache_weights.
LOCAL_STATE_RUNNERS = ('DirectRunner', 'PrismRunner')


def _state_value_size(*objs) -> int:
  """Beam's ``statecache.get_deep_size`` without objsize's walk of every module's globals."""
  import objsize
  from apache_beam.runners.worker import statecache
  return objsize.get_deep_size(*objs, get_size_func=statecache._size_func,  # noqa: SLF001
                               get_referents_func=statecache._get_referents_func,  # noqa: SLF001
                               filter_func=statecache._filter_func,  # noqa: SLF001
                               exclude_modules_globals=False)


def cheap_state_cache_weights() -> None:
  """Weigh the values in Beam's state cache without walking every loaded module first.

  Beam's SDK worker caches user state between bundles and weighs every value it
  caches with ``objsize.get_deep_size``, which starts by collecting the globals of
  every loaded module (about 2,000 with Beam's GCP and AWS extras) so as not to
  count them: ~7 ms per stateful key written. In a replay of the demo's taxi
  consumer (rides and fares joined in per-ride state with timers) that was 49 of
  64 s. Beam's own filter already keeps modules, classes and functions out of the
  walk, so a state value never reaches a module's globals through them: the
  weights, and so what the cache keeps and evicts, are the same. For this
  process's SDK worker (the DirectRunner's default in-memory FnApiRunner, and
  loopback workers); worker processes of the multi-process DirectRunner run
  without the cache (``--max_cache_memory_usage_mb=0``, see :func:`runner_args`).
  (Turning the in-process cache off instead was as fast, but changed the order in
  which timer output reached the files: the taxi join's unmatched lines.)
  """
  from apache_beam.runners.worker import statecache
  statecache.get_deep_size = _state_value_size



def cheap_global_windows() -> None:
  """Make Beam's global window once, not at every element that asks for it.

  ``GlobalWindow`` is a singleton, but its ``__init__`` runs again at every ``GlobalWindow()``,
  and each time reads the global window's end from Beam's protobuf constants: every element
  a ``WindowInto(GlobalWindows())`` assigns, every value a grouping in the global window
  emits (~3 us each; 3% of a replay of the demo's million-event archive, with 300,000 taxi
  positions re-windowed). The singleton's end is set by its first ``__init__`` and never
  changes, so later ones are skipped. Idempotent; for every runner (the windows are made in
  the process that runs the step).
  """
  from apache_beam.transforms import window
  init = window.GlobalWindow.__init__
  if getattr(init, 'sourcebeam_once', False):
    return

  def __init__(self) -> None:
    if getattr(self, '_end', None) is None:
      init(self)

  __init__.sourcebeam_once = True
  window.GlobalWindow.__init__ = __init__


_dofn_specs: Dict[int, Tuple[Any, Tuple[frozenset, frozenset]]] = {}


def remembered_dofn_specs() -> None:
  """Inspect each DoFn's methods for state and timer specs once, not at every asking.

  While it builds, translates and runs a pipeline, Beam asks
  ``userstate.get_dofn_specs`` of the same DoFn instances about 1,800 times for one
  ``run.py publish`` (validation, ``is_stateful_dofn`` in each translation and runner
  phase, each DoFn runner it makes), and each asking builds a signature of every method
  of the DoFn: 2.1 of the 5.7 s a one-line publish took. The answer depends only on
  the instance's methods, which do not change once the DoFn is made, so it is kept per
  instance (by identity, while the instance lives). An answer Beam refuses (duplicate
  parameters) is not kept: each asking raises as before. Idempotent; for every runner
  (the construction happens in the launching process).
  """
  import weakref
  from apache_beam.transforms import userstate
  if getattr(userstate.get_dofn_specs, '__wrapped__', None) is not None:
    return
  inspect_specs = userstate.get_dofn_specs

  def get_dofn_specs(dofn):
    key = id(dofn)
    held = _dofn_specs.get(key)
    if held is not None and held[0]() is dofn:
      states, timers = held[1]
      return set(states), set(timers)
    states, timers = inspect_specs(dofn)
    try:
      ref = weakref.ref(dofn, lambda ref, key=key: _forget(key, ref))
    except TypeError:  # an object without weak references: asked again next time
      return states, timers
    _dofn_specs[key] = (ref, (frozenset(states), frozenset(timers)))
    return set(states), set(timers)

  get_dofn_specs.__wrapped__ = inspect_specs
  userstate.get_dofn_specs = get_dofn_specs


def _forget(key: int, ref: Any) -> None:
  if _dofn_specs.get(key, (None,))[0] is ref:
    del _dofn_specs[key]


def _runner_hung_up(exc: Optional[BaseException]) -> bool:
  """The runner closed a LOOPBACK worker's gRPC stream (CANCELLED): a job's end, not an error."""
  import grpc
  code = getattr(exc, 'code', None)
  return isinstance(exc, grpc.RpcError) and callable(code) and code() == grpc.StatusCode.CANCELLED


class _NotRunnerHangups(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and _runner_hung_up(record.exc_info[1]))


_WORKER_THREADS = ('run_worker', 'read_grpc_client_inputs')


def quiet_worker_hangups() -> None:
  """When a Flink job ends, the job server hangs up on its LOOPBACK workers (threads of this
  process): Beam's worker threads then die of a CANCELLED gRPC stream, each printing a
  traceback, and its data plane logs an error, after a job that succeeded (what a failed job
  had to say is in the job's own state, which the command reports). Those are dropped; any
  other exception in those threads is printed as before. Idempotent."""
  if getattr(threading.excepthook, 'sourcebeam_hangups', False):
    return
  printing = threading.excepthook

  def excepthook(args):
    thread = getattr(args.thread, 'name', '') or ''
    if not (thread.startswith(_WORKER_THREADS) and _runner_hung_up(args.exc_value)):
      printing(args)

  excepthook.sourcebeam_hangups = True
  threading.excepthook = excepthook
  logging.getLogger('apache_beam.runners.worker.data_plane').addFilter(_NotRunnerHangups())


# The state writes a bundle sent and has not yet seen answered (per bundle thread).
_unanswered = threading.local()


@contextlib.contextmanager
def state_answers_at_bundle_end():
  """Within it, :func:`pipelined_state_commits`' commits leave their answers to be waited
  for when it ends (every BundleProcessor.process_bundle, once installed)."""
  _unanswered.answers = []
  try:
    yield
    for answer in _unanswered.answers:
      answer.get()
  finally:
    _unanswered.answers = None


def pipelined_state_commits() -> None:
  """Send every state write of a bundle to the runner before waiting for any answer, and
  wait for the answers once the bundle's other steps have finished.

  At a bundle's end Beam's Python SDK commits each stateful key's state in turn and waits
  for the runner's answer to one before sending the next: with a remote runner (Flink's
  job server) a bundle touching 10 keys waited out 10 gRPC round trips one after another,
  each also waiting for this process's interpreter lock in the threads that send the
  request and read the answer. In a live view pipeline at 1,000 ev/s that was 40% of the
  ordering step's bundle thread (py-spy). Bag and read-modify-write state (all Sourcebeam
  keeps) now send their clear and append requests for every key; other kinds commit as
  before. And a stateful step finishes before the steps after it in its bundle, so the view
  store's writer committed its last batch only after Flink had answered all of them (~150
  keys a bundle at 1,000 ev/s): the answers are now awaited at the bundle's very end, after
  every step has finished. The runner applies a stream's requests in order and the bundle
  still ends only when every write is answered, so what is written, and when the bundle
  counts as done, are unchanged. Idempotent; for in-process (LOOPBACK) workers.
  """
  from apache_beam.runners.worker import bundle_processor as bp
  if getattr(bp.FnApiUserStateContext.commit, 'sourcebeam_pipelined', False):
    return

  def commit(self) -> None:
    deferred = getattr(_unanswered, 'answers', None)
    answers = [] if deferred is None else deferred
    for state in self._all_states.values():
      bag = (state._underlying_bag_state  # noqa: SLF001
             if type(state) is bp.ReadModifyWriteRuntimeState else state)
      if type(bag) is not bp.SynchronousBagRuntimeState:
        state.commit()
        continue
      if bag._cleared:  # noqa: SLF001 (what SynchronousBagRuntimeState.commit sends)
        answers.append(bag._state_handler.clear(bag._state_key))  # noqa: SLF001
      if bag._added_elements:  # noqa: SLF001
        answers.append(bag._state_handler.extend(  # noqa: SLF001
            bag._state_key, bag._value_coder.get_impl(), bag._added_elements))  # noqa: SLF001
    if deferred is None:  # not within a bundle: answered before the commit returns
      for answer in answers:
        answer.get()

  process_bundle = bp.BundleProcessor.process_bundle

  def process_bundle_then_answers(self, *args, **kwargs):
    with state_answers_at_bundle_end():
      return process_bundle(self, *args, **kwargs)

  commit.sourcebeam_pipelined = True
  bp.FnApiUserStateContext.commit = commit
  bp.BundleProcessor.process_bundle = process_bundle_then_answers


def no_state_sampling_threads() -> None:
  """Bundles without Beam's sampling thread.

  For every bundle Beam's Python SDK starts a thread that samples how long each step takes
  (the ``msecs`` metrics, and the lull warnings), and at the bundle's end joins it, waiting
  out its sleep (2 ms at first, growing to 200). A live view pipeline on Flink runs about a
  hundred 10 ms bundles a second in one process: py-spy of the stream at 1,000 ev/s put 12%
  of the bundle threads' time in starting and joining those threads. Without them every
  bundle still tracks its current step, so user counters reach their steps as before; only
  the msecs stay 0 and no lull is logged. Idempotent; for in-process (LOOPBACK) workers.
  """
  from apache_beam.runners.worker import statesampler
  sampler = statesampler.StateSampler
  if getattr(sampler.start, 'sourcebeam_unsampled', False):
    return

  def start(self) -> None:  # StateSampler.start without the Cython base's sampling thread
    self.tracked_thread = threading.current_thread()
    statesampler.set_current_tracker(self)
    self.started = True

  def stop(self) -> None:
    statesampler.set_current_tracker(None)
    self.finished = True

  start.sourcebeam_unsampled = True
  sampler.start, sampler.stop = start, stop


_heap_frozen = False


def freeze_startup_heap() -> None:
  """Keep what a long-running process has made so far out of Python's full collections.

  Python's cyclic collector walks every tracked object at each full (oldest-generation)
  collection, holding the interpreter lock: in a live view pipeline's process (Beam, gRPC,
  protobuf, Kafka and the app, loaded and built before the job starts) each took 93-100 ms,
  twelve times in 80 s at 1,000 ev/s, and every bundle of every step waited meanwhile.
  After one last collection, ``gc.freeze`` moves those objects to a generation the
  collector never walks; what the job makes later (state, caches) is still collected. Once
  per process: objects frozen are never freed, so this is for a process's one long job.
  """
  global _heap_frozen
  if _heap_frozen:
    return
  gc.collect()
  gc.freeze()
  _heap_frozen = True


#: Python's collection thresholds (young, middle, old generation) while a bounded pipeline
#: runs: see :func:`batch_gc_thresholds`. Python's own are (700, 10, 10).
BATCH_GC_THRESHOLDS = (50_000, 20, 100)


def batch_gc_thresholds() -> None:
  """Collect garbage less often while this process runs a bounded pipeline's workers.

  A bounded run keeps millions of objects alive at once (a local runner's groupings hold
  their values until their input is done, a replay's views hold every key's state), and each
  full collection of Python's cyclic collector walks all of them holding the interpreter lock:
  a replay of the demo's million-event archive ran 44 full collections that took 5.1 s of its
  46 (6.8 s of collection in all), a publish of the same events 56 taking 5.4 s. With these
  thresholds: 3 collections past the youngest generation, 0.9 s in all, for the same peak
  memory (the code allocates few reference cycles; those it does are still collected). Only
  ever raises the thresholds; a live pipeline keeps Python's (its full collections are kept
  short by :func:`freeze_startup_heap` instead).
  """
  current = gc.get_threshold()
  if current[0] < BATCH_GC_THRESHOLDS[0]:
    gc.set_threshold(*(max(c, b) for c, b in zip(current, BATCH_GC_THRESHOLDS)))
