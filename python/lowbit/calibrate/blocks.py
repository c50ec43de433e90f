"""Layer-wise calibration: finding a model's repeated blocks, and the sequential driver
that calibrates them one at a time.

The model is run on each batch until the first block (a forward pre-hook records the
block's arguments and stops the forward); the selected layers that ran before it form the
first stage. Then each block is a stage run on the recorded arguments, its outputs
becoming the next block's first argument: with ``propagate="quantized"`` (the default, as
GPTQ does) the outputs of the already quantized block, with ``"float"`` those of the float
block (layers are then replaced only at the end, which makes the result identical to
whole-model mode). Selected layers outside the blocks and after them form a last stage,
run through the whole model. Only one stage's inputs, outputs and statistics are held at
a time.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lowbit.calibrate.accounting import nbytes
from lowbit.calibrate.stage_quantize import quantize_stage
from lowbit.calibrate.stages import Context, Stage


class _Stop(Exception):
    """Raised by the capture hook to end a forward at the first block."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList | nn.Sequential] | None:
    """The repeated blocks of a model: the ``nn.ModuleList`` (or else ``nn.Sequential``)
    with the most parameters among those holding at least two children that contain
    Linear layers."""
    best = None
    for container in (nn.ModuleList, nn.Sequential):
        for name, m in model.named_modules():
            if not isinstance(m, container) or m is model:
                continue
            children = list(m.children())
            with_linear = [c for c in children if any(isinstance(x, nn.Linear) for x in c.modules())]
            if len(with_linear) < 2 or len(with_linear) != len(children):
                continue
            size = sum(p.numel() for p in m.parameters())
            if best is None or size > best[2]:
                best = (name, m, size)
        if best is not None:
            return best[0], best[1]
    return None


def resolve_blocks(model: nn.Module, blocks) -> tuple[str, list[nn.Module]] | None:
    """``blocks`` (None: found automatically; a submodule name; or a list of submodules) as
    (a name for the report, the block modules)."""
    if blocks is None:
        found = find_blocks(model)
        return None if found is None else (found[0], list(found[1]))
    if isinstance(blocks, str):
        try:
            container = model.get_submodule(blocks)
        except AttributeError as e:
            raise ValueError(f"blocks={blocks!r}: no such submodule") from e
        return blocks, list(container.children())
    blocks = list(blocks)
    names = {id(m): n for n, m in model.named_modules()}
    if not blocks or any(id(b) not in names for b in blocks):
        raise ValueError("blocks must be a submodule name or a list of submodules of the model")
    return ", ".join(names[id(b)] for b in blocks[:2]) + (", ..." if len(blocks) > 2 else ""), blocks


def _replace_first(inp, out):
    args, kwargs = inp
    hidden = out[0] if isinstance(out, (tuple, list)) else out
    if args:
        return (hidden, *args[1:]), kwargs
    first = next(iter(kwargs))
    return args, {**kwargs, first: hidden}


def _capture(model, batches, forward, first_block) -> list:
    """The first block's (args, kwargs) on every batch; each forward stops there."""
    captured = []

    def stop(_m, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = first_block.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for b in batches:
            try:
                forward(model, b)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise ValueError(f"the first block ran on {len(captured)} of {len(batches)} calibration batches")
    return captured


def run_sequential(ctx: Context, model, entries, batches, forward, blocks, shared_weights,
                   block_hooks: tuple[Callable, Callable] | None = None) -> None:
    """``block_hooks``: ``(enter(i, block), leave(i, block))``, called before block i is
    calibrated and after its outputs have become the next block's inputs (the streaming
    quantizer reads a block's weights in ``enter`` and writes and frees them in ``leave``)."""
    in_block = {}
    for i, b in enumerate(blocks):
        for m in b.modules():
            in_block[id(m)] = i
    outside = [e for e in entries if id(e.linear) not in in_block]

    # Which outside layers run before the first block: those the capture forward reaches.
    seen = set()
    handles = [e.linear.register_forward_pre_hook(lambda m, a, e=e: seen.add(e)) for e in outside]
    try:
        inputs = _capture(model, batches, forward, blocks[0])
    finally:
        for h in handles:
            h.remove()
    before = [e for e in outside if e in seen]
    after = [e for e in outside if e not in seen]
    if before:
        def stop(_m, _args):
            raise _Stop

        def run_until_blocks(b):
            try:
                forward(model, b)
            except _Stop:
                pass

        stop_handle = blocks[0].register_forward_pre_hook(stop)
        try:
            quantize_stage(ctx, Stage("before blocks", model, batches, run_until_blocks, before), shared_weights)
        finally:
            stop_handle.remove()
        inputs = _capture(model, batches, forward, blocks[0])  # from the quantized layers before it

    held = nbytes(inputs)
    ctx.hold(held)
    for i, block in enumerate(blocks):
        if block_hooks is not None:
            block_hooks[0](i, block)
        stage_entries = [e for e in entries if in_block.get(id(e.linear)) == i]
        stage = Stage(f"block {i}", block, inputs, lambda inp, block=block: block(*inp[0], **inp[1]), stage_entries)
        weights = sum(p.numel() * p.element_size() for p in block.parameters())
        ctx.summary.block_weight_bytes = max(ctx.summary.block_weight_bytes, weights)
        ctx.summary.block_activation_bytes = max(ctx.summary.block_activation_bytes, held)
        if ctx.propagate == "float":
            # The float outputs, before the block changes; inputs and outputs are both held.
            outputs = [stage.run(inp) for inp in inputs]
            ctx.hold(nbytes(outputs))
        if stage_entries:
            quantize_stage(ctx, stage, shared_weights)
        if ctx.propagate == "float":
            inputs[:] = [_replace_first(inp, out) for inp, out in zip(inputs, outputs)]
            del outputs
        else:
            # Each output replaces its input at once: one batch more than the inputs, at most.
            for j, inp in enumerate(inputs):
                inputs[j] = _replace_first(inp, stage.run(inp))
        ctx.state.release_all()
        held = nbytes(inputs)
        ctx.hold(held)
        if block_hooks is not None:
            block_hooks[1](i, block)
    ctx.release(held)
    del inputs
    if after:
        quantize_stage(ctx, Stage("after blocks", model, batches, lambda b: forward(model, b), after), shared_weights)
