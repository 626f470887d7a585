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


def catch_layer0_inputs(model, windows, layers_path="model.layers"):
    layers = model.get_submodule(layers_path)
    original = layers[0]
    caught = []

    class Catcher(nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            caught.append((hidden_states, (args, kwargs)))
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


def weight_matrices(layer, routers=()):
    """[out, in] views of every matrix of a layer a method prunes: nn.Linear, Conv1D (stored [in, out]),
    and each expert of a fused 3-D experts parameter (magnitude only: its orientation does not matter)."""
    from transformers.pytorch_utils import Conv1D
    out = {}
    for name, module in layer.named_modules():
        if name in routers:
            continue
        if isinstance(module, nn.Linear):
            out[name] = module.weight
        elif isinstance(module, Conv1D):
            out[name] = module.weight.T
        else:
            for pname, param in module.named_parameters(recurse=False):
                if param.dim() == 3:
                    out.update({f"{name}.{e}.{pname}": param[e] for e in range(param.shape[0])})
    return out


@torch.no_grad()
def prune_in_memory(folder, windows, method, sparsity, nm, layers_path="model.layers", routers=()):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inputs, (args, kwargs) = catch_layer0_inputs(model, windows, layers_path)
    per_layer = sparsity if isinstance(sparsity, list) else [sparsity] * len(model.get_submodule(layers_path))
    for layer, sparsity in zip(model.get_submodule(layers_path), per_layer):
        matrices = weight_matrices(layer, routers)
        modules = {n: _maybe(layer, n) for n in matrices if _maybe(layer, n) is not None}  # not experts
        seen = {n: [] for n in modules}
        hooks = [m.register_forward_hook(lambda mod, a, out, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
                 for n, m in modules.items()]
        for x in inputs:
            layer(x, *args, **kwargs)
        for h in hooks:
            h.remove()
        for name, w in matrices.items():
            if method in ("wanda", "ria"):
                norms = torch.cat(seen[name]).double().pow(2).sum(0).sqrt().float()
                scores, per_row = w.abs() * norms, True
                if method == "ria":  # (|W|/row sum + |W|/column sum) * ||X_j||^0.5
                    a = w.abs()
                    scores = (a / a.sum(1, keepdim=True) + a / a.sum(0, keepdim=True)) * norms.pow(0.5)
            else:
                scores, per_row = w.abs(), False
            w[argsort_mask(scores, sparsity, nm, per_row)] = 0
        outs = []
        for x in inputs:
            out = layer(x, *args, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
        inputs = outs
    return model


def _maybe(layer, name):
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None
