"""Greedy decoding of a transformers causal LM with as little as possible around the matmuls.

``transformers``' ``generate`` spends, per decode step of a 491.8M Llama on 2 cores, 1-3
ms outside the model (its loop, logits processors, stopping criteria, cache bookkeeping)
and, compiled, 0.3-3.2 ms in dynamo's guards, which check every parameter and buffer of
the model on every call (bench/RESULTS.md). At 10-20 ms a token that is 10-30% of it.

``Decoder`` keeps a static KV cache and compiles one step, ``token -> next token``:
the forward at one position and the argmax, fixed shapes. The step attends over a window
of the cache that grows with the sequence (128 positions, then doubling up to
``max_length``; one compiled graph per window), not over all of it: a static cache is
otherwise read, and copied by transformers' ``repeat_kv``, whole at every step. The step
is compiled without guards (``torch.compiler.skip_all_guards_unsafe``; keeping only the
tensor guards still cost 1.3 ms a step of the 491.8M Llama, bench/RESULTS.md): what guards
would check, the Decoder fixes itself. It is bound to one model and one cache, the step has a code object
of its own (dynamo keys compiled code by code object), and its only caller, ``generate``,
passes a [batch_size, 1] int64 token and a [1] int64 position on the model's device after
checking the prompt. The loop around it is a Python ``for`` that stores a token and bumps
the position in place. The cache's layers count their own writes (transformers' static
layers), so steps run in order from ``generate``'s reset, never at chosen positions.

The tokens are ``generate``'s greedy tokens for the same model: prefill is the model's own
forward over the prompt into the cache (eager: it runs once per call), each step the
model's forward at the next position (``tests/test_decode.py`` compares the two).

    decoder = lowbit.decode.Decoder(model, max_length=512)
    out = decoder.generate(ids, max_new_tokens=64)      # [B, prompt + 64] token ids
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable

import torch
from torch import nn


class Decoder:
    """Greedy decoding of ``model`` (a transformers causal LM) for batches of ``batch_size``
    sequences of at most ``max_length`` tokens, prompt included; ``compile=False`` runs the
    same step eagerly. Each window's compiled step is made when a sequence first reaches
    it and reused."""

    def __init__(self, model: nn.Module, max_length: int, batch_size: int = 1, compile: bool = True):
        from transformers import StaticCache

        if not hasattr(model, "config") or not callable(getattr(model, "forward", None)):
            raise TypeError(f"Decoder needs a transformers causal LM, got {type(model).__name__}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (one prompt token, one new), got {max_length}")
        self.model = model
        self.max_length = max_length
        self.batch_size = batch_size
        self.cache = StaticCache(config=model.config, max_cache_len=max_length)
        for layer in self.cache.layers:
            layer.update = types.MethodType(_windowed_update, layer)
            layer.get_mask_sizes = types.MethodType(_windowed_mask_sizes, layer)
        self._set_window(max_length)
        # transformers 5 renames the forward's past_key_values to cache.
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.compile = compile
        self._steps: dict[int, Callable] = {}

    def windows(self) -> list[int]:
        """The attention windows, smallest first: a step at position p attends over the first
        window above p of the cache, not all of it (WINDOW_GROWTH)."""
        out, w = [], MIN_WINDOW
        while w < self.max_length:
            out.append(w)
            w *= WINDOW_GROWTH
        return out + [self.max_length]

    def _set_window(self, window: int) -> None:
        for layer in self.cache.layers:
            layer.window = window
        self.window = window

    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The compiled step of the current window (``_set_window``), made on first use."""
        if self.window not in self._steps:
            self._steps[self.window] = self._compiled_step() if self.compile else self._step
        return self._steps[self.window](token, position)

    def _compiled_step(self) -> Callable:
        # Dynamo keeps compiled graphs per code object, and without guards a graph compiled
        # for another model or window would run for this one: each window's step gets a code
        # object of its own, traced while its window is set (the window is a constant in it).
        own = types.FunctionType(Decoder._step.__code__.replace(), globals(), "_step")
        # Inductor's C++ wrapper calls the graph's kernels and lowbit's ops from C++, not
        # from generated Python (0.4-2 ms less a step on 2 cores, bench/RESULTS.md).
        return torch.compile(types.MethodType(own, self), fullgraph=True, dynamic=False,
                             options={"cpp_wrapper": True, "guard_filter_fn": torch.compiler.skip_all_guards_unsafe})

    def _step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=token, cache_position=position, position_ids=position.expand(token.shape[0], 1),
                            use_cache=True, **{self._cache_kw: self.cache}).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """The prompt ``ids`` ([batch_size, n] token ids, no padding) followed by
        ``max_new_tokens`` greedy tokens (no end-of-sequence stop)."""
        if ids.dim() != 2 or ids.shape[0] != self.batch_size or ids.dtype != torch.long:
            raise ValueError(f"ids must be int64 [{self.batch_size}, n] token ids, got {ids.dtype} {list(ids.shape)}")
        device = next(self.model.parameters(), next(self.model.buffers(), ids)).device
        if ids.device != device:
            raise ValueError(f"ids are on {ids.device}, the model on {device}")
        n = ids.shape[1]
        if n < 1 or max_new_tokens < 1 or n + max_new_tokens > self.max_length:
            raise ValueError(f"a prompt of {n} tokens and {max_new_tokens} new ones do not fit max_length "
                             f"{self.max_length} (each at least 1)")
        self.cache.reset()
        windows = self.windows()
        self._set_window(next(w for w in windows if w >= n))
        logits = self.model(input_ids=ids, cache_position=torch.arange(n, device=device), use_cache=True,
                            logits_to_keep=1, **{self._cache_kw: self.cache}).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        out = torch.empty(ids.shape[0], n + max_new_tokens, dtype=ids.dtype, device=device)
        out[:, :n] = ids
        out[:, n:n + 1] = token
        position = torch.tensor([n], device=device)
        for i in range(n + 1, n + max_new_tokens):
            # This step writes position i - 1 and attends over positions 0..i-1.
            if i > self.window:
                self._set_window(next(w for w in windows if w >= i))
            token = self.step(token, position)
            out[:, i:i + 1] = token
            position += 1
        return out


# Attention windows: the first MIN_WINDOW positions, then WINDOW_GROWTH times more each time
# the sequence outgrows one, up to max_length. A static cache's attention otherwise reads
# (and transformers' repeat_kv copies, head group by head group) the whole cache every
# step: 12.1 ms a W4A16 step of the 491.8M Llama at max_length 97, 20.1 at 512, 50.9 at 2048;
# windowed, 2048 runs as 97 does (bench/RESULTS.md). Each window is one compiled graph, so
# doubling bounds the attention read to twice what a position needs with log2 graphs.
MIN_WINDOW = 128
WINDOW_GROWTH = 2


def _windowed_update(layer, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
    """A static layer's update (the write at its own count of positions), returning only
    the first ``layer.window`` positions of its cache."""
    keys, values = type(layer).update(layer, key_states, value_states, *args, **kwargs)
    return keys[:, :, :layer.window], values[:, :, :layer.window]


def _windowed_mask_sizes(layer, *args, **kwargs) -> tuple[int, int]:
    """The attention mask's (length, offset): the window, from position 0."""
    return layer.window, 0
