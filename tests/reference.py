"""Whole-model pruning written independently of the library, for checking the streamed results.

The full model is loaded; layer-0 inputs are caught the way the SparseGPT/Wanda scripts do it
(a Catcher that raises), each layer's linears see all calibration inputs through hooks, masks
come from a stable argsort, and the pruned layer's outputs feed the next layer.
"""
import torch
from torch import nn
from transformers import AutoModelForCausalLM


class _Caught(Exception):
    pass


def catch_layer0_inputs(model, windows):
    layers = model.model.layers
    original = layers[0]
    caught = []

    class Catcher(nn.Module):
        def forward(self, hidden_states, **kwargs):
            caught.append((hidden_states, kwargs))
            raise _Caught

    layers[0] = Catcher()
    for i in range(len(windows)):
        try:
            model(windows[i:i + 1], use_cache=False)
        except _Caught:
            pass
    layers[0] = original
    return [h for h, _ in caught], caught[0][1]


def argsort_mask(scores, sparsity, nm, per_row):
    """True = prune; ties go to the lower index, as a stable sort orders them."""
    rows, cols = scores.shape
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        groups = scores.reshape(-1, m)
        order = torch.argsort(groups, dim=1, stable=True)[:, :n]
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
        return mask.reshape(rows, cols)
    if per_row:
        k = int(cols * sparsity)
        order = torch.argsort(scores, dim=1, stable=True)[:, :k]
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)
    k = int(scores.numel() * sparsity)
    mask[torch.argsort(scores.reshape(-1), stable=True)[:k]] = True
    return mask.reshape(rows, cols)


@torch.no_grad()
def prune_in_memory(folder, windows, method, sparsity, nm):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inputs, kwargs = catch_layer0_inputs(model, windows)
    for layer in model.model.layers:
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        seen = {n: [] for n in linears}
        hooks = [m.register_forward_hook(lambda mod, args, out, n=n: seen[n].append(args[0].reshape(-1, args[0].shape[-1])))
                 for n, m in linears.items()]
        for x in inputs:
            layer(x, **kwargs)
        for h in hooks:
            h.remove()
        for name, linear in linears.items():
            w = linear.weight
            if method == "wanda":
                norms = torch.cat(seen[name]).double().pow(2).sum(0).sqrt().float()
                scores, per_row = w.abs() * norms, True
            else:
                scores, per_row = w.abs(), False
            w[argsort_mask(scores, sparsity, nm, per_row)] = 0
        outs = []
        for x in inputs:
            out = layer(x, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
        inputs = outs
    return model
