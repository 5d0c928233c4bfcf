"""Frozen models' weights kept in host memory and streamed to the device block by block.

``--offload-frozen-models``: the teachers (or the DPO reference) of a pipeline stage no longer
sit on the GPU. Their weights live in pinned host memory; a forward pre-hook on each block
(embedding, each transformer layer, final norm, output layer) copies the block's weights to the
device and starts copying the *next* block on a side stream, and a forward hook frees the block
after it ran. At most two blocks of frozen weights are on the device at any time (tied
embedding/output weights are reference-counted, so a block that needs them brings them back).

Trade-off (docs/scaling.md): saves ``frozen models x stage weights`` of GPU memory, minus two
blocks; costs one host-to-device copy of every frozen weight per micro-batch. The copy of block
i+1 overlaps the compute of block i, so it is hidden when a micro-batch has enough tokens
(roughly tokens > GPU FLOP/s / host-link bytes/s, ~16k tokens for 400 TFLOP/s over 25 GB/s);
below that the teachers' forward is bound by the host link. Pinned host memory needed per GPU:
the frozen models' stage weights.

Without CUDA (the CPU tests) the same hooks run, copying host tensors to fresh host tensors
synchronously: the scheduling, the reference counts and the peak-residency bound are the same.
"""

from __future__ import annotations

import torch


def _blocks(model) -> list[tuple[torch.nn.Module, list[torch.nn.Parameter]]]:
    """The streamed blocks of a Megatron GPTModel stage, in forward order, with their parameters."""
    blocks = []
    if getattr(model, "pre_process", False) and getattr(model, "embedding", None) is not None:
        blocks.append(model.embedding)
    blocks.extend(model.decoder.layers)
    if getattr(model.decoder, "final_layernorm", None) is not None:
        blocks.append(model.decoder.final_layernorm)
    out = [(block, list(block.parameters())) for block in blocks]
    if getattr(model, "post_process", False):
        params = list(model.output_layer.parameters())
        if model.share_embeddings_and_output_weights:
            params.append(model.shared_embedding_or_output_weight())  # passed as ``weight=``
        out.append((model.output_layer, params))
    covered = {id(p) for _, ps in out for p in ps}
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise ValueError(f"cannot offload: parameters outside the streamed blocks: {missing[:4]}")
    return out


class FrozenWeightStreamer:
    """Streams one frozen model's weights from host memory, one block ahead (see module doc).

    ``blocks``: (module, parameters) in forward order; ``block_bytes``: their sizes.
    ``resident_bytes`` / ``peak_resident_bytes``: bytes of this model's weights on the device now /
    at most since construction (or ``reset_peak``).
    """

    def __init__(self, model: torch.nn.Module, device: torch.device | None = None):
        if any(p.requires_grad for p in model.parameters()):
            raise ValueError("only frozen models (no parameter requires grad) can be offloaded")
        self.device = device or next(model.parameters()).device
        self.blocks = _blocks(model)
        self.block_bytes = [sum(p.numel() * p.element_size() for p in ps) for _, ps in self.blocks]
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._host, self._refs = {}, {}
        for p in model.parameters():
            host = p.detach().to("cpu", copy=True)
            self._host[p] = host.pin_memory() if self.stream is not None else host
            self._refs[p] = 0
            p.data = self._placeholder(p)
        self._ready: dict[int, torch.cuda.Event | None] = {}  # block index -> copy done (None: sync)
        self.resident_bytes = self.peak_resident_bytes = 0
        self._handles = []
        for i, (module, _) in enumerate(self.blocks):
            self._handles.append(module.register_forward_pre_hook(lambda m, a, i=i: self._enter(i)))
            self._handles.append(module.register_forward_hook(lambda m, a, o, i=i: self._exit(i)))

    def _placeholder(self, p):
        return torch.empty(0, dtype=p.dtype, device=self.device)

    def _load(self, i: int) -> None:
        """Start copying block i to the device (on the side stream with CUDA)."""
        if i in self._ready or i >= len(self.blocks):
            return
        event = None
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                self._materialize(i)
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            self._materialize(i)
        self._ready[i] = event

    def _materialize(self, i: int) -> None:
        for p in self.blocks[i][1]:
            self._refs[p] += 1
            if self._refs[p] == 1:
                p.data = self._host[p].to(self.device, non_blocking=True, copy=True)
                self.resident_bytes += p.numel() * p.element_size()
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    def _enter(self, i: int) -> None:
        if i == 0:  # a new forward: drop blocks a forward that raised midway left on the device
            for j in list(self._ready):
                self._exit(j)
        self._load(i)
        event = self._ready[i]
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for p in self.blocks[i][1]:
                p.data.record_stream(compute)  # freed memory is reused only after compute used it
        self._load(i + 1)  # prefetch: overlaps this block's compute

    def _exit(self, i: int) -> None:
        del self._ready[i]
        for p in self.blocks[i][1]:
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self.resident_bytes -= p.numel() * p.element_size()
                p.data = self._placeholder(p)

    def reset_peak(self) -> None:
        self.peak_resident_bytes = self.resident_bytes

    def remove(self) -> None:
        """Undo: hooks removed, weights back on the device for good."""
        for h in self._handles:
            h.remove()
        for p, host in self._host.items():
            p.data = host.to(self.device, copy=True)
        self._handles, self._host = [], {}


def offload_frozen_models(models: list) -> list[FrozenWeightStreamer]:
    """Offload each frozen model (call after their weights are loaded and cast)."""
    return [FrozenWeightStreamer(m) for m in models]
