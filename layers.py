"""Layers that stand in for nn.Linear: LoRA adapters (fine-tuning) and int8 weights (inference). One function,
replace_linears, swaps them into a model.

    from layers import add_lora, merge_lora, quantize_int8
    add_lora(model.trf_blocks, rank=16, alpha=16)   # train the adapters only
    merge_lora(model)                               # plain nn.Linear layers again, same outputs
    quantize_int8(model)                            # per-channel int8 weights, a quarter of the bytes
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class StandIn(nn.Module):
    """Base of the layers here: replace_linears never looks inside one, so a wrapped nn.Linear is not wrapped twice."""


def replace_linears(module, make, kind=nn.Linear):
    """Replace every submodule of type `kind` inside module (at any depth, in place) by make(layer); returns module."""
    for name, child in list(module.named_children()):
        if isinstance(child, kind):
            setattr(module, name, make(child))
        elif not isinstance(child, StandIn):
            replace_linears(child, make, kind)
    return module


# --- LoRA: low-rank adapters (finetune_cls.py / finetune_chat.py --trainable lora) -------------------------------

class LoRALinear(StandIn):
    """A frozen nn.Linear plus a trainable low-rank update: y = base(x) + (alpha / rank) * (x A^T) B^T.

    A (rank, in_features) starts random and B (out_features, rank) at zero, so a new adapter leaves the layer's
    output unchanged until training moves B. `weight`, `bias`, `in_features` and `out_features` are the base
    layer's, so code that reads them keeps working. merge() folds the update into a plain nn.Linear.
    """

    def __init__(self, linear, rank=16, alpha=16):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.base = linear.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        w = linear.weight
        self.A = nn.Parameter(torch.empty(rank, linear.in_features, device=w.device, dtype=w.dtype))
        self.B = nn.Parameter(torch.zeros(linear.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # the init nn.Linear gives its own weight

    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)
    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.A), self.B) * self.scaling

    @torch.no_grad()
    def merge(self):
        """A plain nn.Linear with weight W + (alpha / rank) B A: the same outputs, no adapter."""
        w = self.base.weight
        merged = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None, device=w.device,
                           dtype=w.dtype)
        merged.weight.copy_(w + self.scaling * (self.B @ self.A).to(w.dtype))
        if self.base.bias is not None:
            merged.bias.copy_(self.base.bias)
        return merged

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}"


def add_lora(module, rank=16, alpha=16):
    """Wrap every nn.Linear inside module in a LoRALinear (in place); returns module.

    The wrapped weights are frozen; other parameters (embeddings, LayerNorms) keep their requires_grad, so call
    model.requires_grad_(False) first to train the adapters alone.
    """
    return replace_linears(module, lambda linear: LoRALinear(linear, rank, alpha))


def merge_lora(module):
    """Replace every LoRALinear inside module by its merged nn.Linear (in place); returns module."""
    return replace_linears(module, LoRALinear.merge, kind=LoRALinear)


# --- int8 weights (generate.py / finetune_cls.py --quantize int8) -----------------------------------------------

class Int8Linear(StandIn):
    """An inference-only Linear whose weight is stored as int8 with one float scale per output channel (row):
    weight[o] ~ weight_int8[o] * weight_scale[o], scale = max |weight[o]| / 127 (symmetric, so 0 stays 0).

    A quarter of fp32's bytes, and decoding at batch 1 is bound by reading the weights, so it also reads a quarter.
    state_dict: weight (out, in) int8 in nn.Linear's layout, weight_scale (out,) float32, bias as in nn.Linear.
    """
    FEW_ROWS = 16  # up to this many rows per call the int8 kernel beats converting the weights to float

    def __init__(self, in_features, out_features, bias=True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # frozen parameters rather than buffers, so parameter counts and .to(device) treat them like nn.Linear's
        w = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear, quantize=True):
        """The int8 version of an nn.Linear; quantize=False gives an empty one of the same shape (to load into)."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device)
        if quantize:
            w = w.float()
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,); the clamp keeps all-zero rows finite
            layer.weight.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
            layer.weight_scale.copy_(scale)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach().float())
        return layer

    def forward(self, x):
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and x.shape[0] <= self.FEW_ROWS:
            # decoding: torch's int8 kernel reads the int8 weights directly; on CPU it is fast only with bf16
            # activations (their rounding adds ~0.3 % relative error to the ~1 % of the int8 weights)
            y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.weight,
                                                   self.weight_scale.to(torch.bfloat16)).to(x.dtype)
        else:
            # many rows (prefill, evaluation): converting the weights once is cheap next to the matmul
            y = (x @ self.weight.to(x.dtype).t()) * self.weight_scale.to(x.dtype)  # (x W^T) s = x (W s)^T
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(model, quantize=True):
    """Replace every nn.Linear in model (attention, MLP, out_head) by an Int8Linear, in place; returns model.

    quantize=False only swaps in empty int8 layers of the same shapes, to load an int8 state_dict into.
    The token and position embeddings and the LayerNorms stay float.
    """
    return replace_linears(model, lambda linear: Int8Linear.from_linear(linear, quantize))


def is_int8_state_dict(state_dict):
    """True for a state_dict written from a quantize_int8 model."""
    return any(k.endswith(".weight_scale") for k in state_dict)

