"""The random number generators' states (torch, CUDA, numpy, python) as tensors and numbers, for checkpoints."""
import random

import numpy as np
import torch

__all__ = ['get_rng_states', 'set_rng_states']


def get_rng_states():
    "The RNG states of torch (CPU and every CUDA device in use), numpy and python, as tensors and numbers."
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    states = {'torch': torch.get_rng_state(),
              'python': {'version': py_version, 'state': torch.tensor(py_state, dtype=torch.int64),
                         'gauss_next': py_gauss},
              'numpy': {'kind': np_kind, 'keys': torch.from_numpy(np_keys.astype(np.int64)), 'pos': int(np_pos),
                        'has_gauss': int(np_has_gauss), 'cached_gaussian': float(np_gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized(): states['cuda'] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    "Restore what `get_rng_states` returned (CUDA states only where CUDA is available)."
    torch.set_rng_state(states['torch'])
    py = states['python']
    random.setstate((py['version'], tuple(py['state'].tolist()), py['gauss_next']))  # sync-ok: CPU tensor, checkpoint loading
    n = states['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],  # sync-ok: CPU tensor, checkpoint loading
                         n['cached_gaussian']))
    if 'cuda' in states and torch.cuda.is_available():
        for i, s in enumerate(states['cuda'][:torch.cuda.device_count()]): torch.cuda.set_rng_state(s, i)
