"""Checkpoints that continue a fit exactly, and exports for inference: every public name, gathered from where it lives.

- `checkpoint_io`: files written atomically and read back without running code (`atomic_save`, `safe_load`), and
  a Learner's whole state in them (`save_checkpoint`, `load_checkpoint`, `learner_state`, `restore`);
- `rng`: the random number generators' states (`get_rng_states`, `set_rng_states`);
- `callbacks.resume`: `ResumeCallback`, which `fit(..., resume=...)` adds;
- `export`: `export_learner` / `load_learner`, an inference file in the same safe format.

`from learnkit.checkpoint import ...` keeps working for all of them.
"""
from .callbacks.resume import ResumeCallback
from .checkpoint_io import (CHECKPOINT_FORMAT, EXPORT_FORMAT, VERSION, VERSIONS, CheckpointError, UnsafeCheckpointError,
                            atomic_save, bare_model, checkpoint_file, epoch_start_state, is_main_process, learner_state,
                            load_checkpoint, load_checkpoint_from_rank0, plain, read_checkpoint, restore, safe_load,
                            save_checkpoint)
from .export import ExportedData, export_learner, load_learner
from .rng import get_rng_states, set_rng_states

__all__ = ['CheckpointError', 'UnsafeCheckpointError', 'atomic_save', 'safe_load', 'checkpoint_file', 'plain',
           'learner_state', 'save_checkpoint', 'read_checkpoint', 'load_checkpoint', 'restore', 'get_rng_states',
           'set_rng_states', 'epoch_start_state', 'bare_model', 'ResumeCallback', 'export_learner', 'ExportedData',
           'load_learner', 'is_main_process', 'load_checkpoint_from_rank0', 'CHECKPOINT_FORMAT', 'EXPORT_FORMAT',
           'VERSION', 'VERSIONS']
