"""Small models, data and test cases shared by the test modules (curvlinops style).

Every random number comes from an explicit ``torch.Generator``: a model's default
initialisation (which draws from the global RNG) is overwritten by :func:`reinit`, so
each case is the same on every run and no test depends on the global RNG.

A case is a dict:

- ``name``: test id.
- ``model``: zero-argument factory of a fresh model (fp32, CPU).
- ``data``: zero-argument factory of ``(inputs, targets)`` tensors.
- ``wrap``: how the data reaches the API: ``"tensors"``, ``"dataset"``, ``"loader"``,
  ``"loader_shuffled"``.
- ``loss_fn``: ``None`` (cross-entropy) or ``loss_fn(outputs, targets)``, mean over the batch.
- ``metrics``: the metrics asked for.
- ``bn``: ``"eval"`` or ``"batch"`` (with ``"batch"`` the engine is told to use one batch
  holding all data, so the oracle's batch statistics are over the same samples).
- ``train_mode``: put the user's model in train mode before the call (results must not care).
- ``x``, ``y``: surface ranges; ``curve_x``: curve range.
- ``strategies``: engine strategies to check (``"auto"``, ``"vmap"``, ``"loop"``).
- ``dtype``: the model's and inputs' dtype (float32 unless stated).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

ALL_STRATEGIES = ("auto", "vmap", "loop")


# --- initialisation ----------------------------------------------------------------------
def reinit(model: nn.Module, seed: int, gain: float = 1.0) -> nn.Module:
    """Overwrite every parameter and BN buffer from a private generator seeded with ``seed``.

    Weights (dim > 1) get N(0, gain^2 / fan_in), 1-D parameters N(0, 0.1^2), BatchNorm
    scales 1 + N(0, 0.2^2). BatchNorm running statistics are made non-trivial
    (mean N(0, 0.2^2), var U(0.5, 1.5), 5 batches tracked) so eval and batch modes differ.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (gain / fan_in**0.5))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                if m.track_running_stats:
                    m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                    m.num_batches_tracked.fill_(5)
    return model


def classification_data(n: int, shape: tuple[int, ...], classes: int, seed: int):
    """``n`` Gaussian inputs of ``shape`` and uniform class labels, from a private generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g), torch.randint(0, classes, (n,), generator=g)


# --- models ------------------------------------------------------------------------------
def mlp(seed: int = 0) -> nn.Module:
    return reinit(nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4)), seed, gain=2.0)


def mlp_dropout(seed: int = 1) -> nn.Module:
    model = nn.Sequential(
        nn.Linear(10, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4), nn.Dropout(0.3)
    )
    return reinit(model, seed, gain=2.0)


class ScaledByBuffer(nn.Module):
    """BatchNorm, and a non-persistent buffer (not in state_dict) the forward uses."""

    def __init__(self, s: float):
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 3), nn.BatchNorm1d(3)
        self.register_buffer("scale", torch.full((3,), s), persistent=False)

    def forward(self, x):
        return self.bn(self.fc(x)) * self.scale


def scaled_pair() -> tuple[ScaledByBuffer, ScaledByBuffer]:
    """Two :class:`ScaledByBuffer` models whose interpolation direction moves every float
    buffer: the non-persistent ``scale`` (1 -> 2) and BatchNorm's running mean."""
    torch.manual_seed(0)
    a = ScaledByBuffer(1.0).eval()
    torch.manual_seed(1)
    b = ScaledByBuffer(2.0).eval()
    with torch.no_grad():
        b.bn.running_mean.fill_(0.5)
    return a, b


class TiedMLP(nn.Module):
    """Encoder and decoder share one weight tensor (``dec.weight is enc.weight``)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(8, 8)
        self.dec = nn.Linear(8, 8)
        self.dec.weight = self.enc.weight
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.dec(torch.tanh(self.enc(x)))))


def tied_mlp(seed: int = 2) -> nn.Module:
    return reinit(TiedMLP(), seed, gain=2.0)


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(h)))


class BNResCNN(nn.Module):
    """conv-BN-ReLU stem, one residual block with BatchNorm, global average pool, linear head."""

    def __init__(self, channels: int = 6, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.block = ResBlock(channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        h = self.block(F.relu(self.bn(self.stem(x))))
        return self.head(h.mean(dim=(2, 3)))


def bn_res_cnn(seed: int = 3) -> nn.Module:
    return reinit(BNResCNN(), seed, gain=1.5)


def resnet18(seed: int = 4) -> nn.Module:
    return reinit(torchvision.models.resnet18(num_classes=10), seed, gain=1.0)


# --- models researchers bring (issue 14) -------------------------------------------------
class RecurrentNet(nn.Module):
    """An LSTM or GRU over a sequence, its last output to a linear head (no vmap rule)."""

    def __init__(self, kind: str = "lstm", features: int = 5, hidden: int = 8, classes: int = 3):
        super().__init__()
        cell = {"lstm": nn.LSTM, "gru": nn.GRU}[kind]
        self.rnn = cell(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def lstm_net(seed: int = 20) -> nn.Module:
    return reinit(RecurrentNet("lstm"), seed, gain=1.5)


def gru_net(seed: int = 21) -> nn.Module:
    return reinit(RecurrentNet("gru"), seed, gain=1.5)


class EncoderNet(nn.Module):
    """A Transformer encoder layer (eval-mode fast path), mean-pooled, linear head."""

    def __init__(self, d: int = 8, classes: int = 3):
        super().__init__()
        self.embed = nn.Linear(5, d)
        self.encoder = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def transformer(seed: int = 22) -> nn.Module:
    return reinit(EncoderNet(), seed, gain=1.0)


def qat_mlp(seed: int = 23) -> nn.Module:
    """A quantisation-aware-training MLP (``prepare_qat``: FakeQuantize with observers that
    update ``min_val``/``max_val``/``scale`` in every forward, also in eval mode)."""
    import warnings

    import torch.ao.quantization as tq

    model = nn.Sequential(tq.QuantStub(), nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3),
                          tq.DeQuantStub())
    reinit(model, seed, gain=2.0)
    model.qconfig = tq.get_default_qat_qconfig("fbgemm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notice of eager-mode QAT
        tq.prepare_qat(model.train(), inplace=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model(torch.randn(32, 6, generator=g))  # calibrate the observers
    return model.eval()


def parametrized_mlp(seed: int = 24) -> nn.Module:
    """weight_norm, spectral_norm and orthogonal parametrizations (torch.nn.utils.parametrize)."""
    from torch.nn.utils import parametrizations as P

    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    reinit(model, seed, gain=2.0)
    # spectral_norm draws its power-iteration vectors (buffers) from the global generator:
    # seeded here, or two builds differed by the tests that ran before (an oracle building
    # its own copy read 1.1401 where the model gives 1.1242, in one test order of three).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        P.weight_norm(model[0])
        P.spectral_norm(model[2])
        P.orthogonal(model[4])
    return model.eval()


def legacy_weight_norm_mlp(seed: int = 25) -> nn.Module:
    """Legacy ``torch.nn.utils.weight_norm``: ``weight`` is a plain attribute recomputed by a
    pre-hook; after one forward with autograd on it is a non-leaf (``deepcopy`` refuses)."""
    import warnings

    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    reinit(model, seed, gain=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in favour of parametrizations
        torch.nn.utils.weight_norm(model[0])
    model(torch.zeros(1, 6))  # an ordinary forward, with autograd: model[0].weight non-leaf
    return model.eval()


class StatefulNet(nn.Module):
    """A forward that writes state: a buffer counter, a non-persistent buffer, a scale it
    uses and then changes in place, attributes (``self.features = h``), and hooks that
    store into the module, into a closure's dict and into a hook object."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(6, 8)
        self.l2 = nn.Linear(8, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("scratch", torch.zeros(8), persistent=False)
        self.register_buffer("scale", torch.ones(()))
        self.seen: list = []
        self.closure_store: dict = {}
        store = self.closure_store

        def remember(module, inputs, output):
            store["last"] = output  # a closure over an object the model holds
            module.last_output = output

        def scale_inputs(module, args):
            module.pre_calls = getattr(module, "pre_calls", 0) + 1
            return (args[0] * 1.0,)

        self.l1.register_forward_hook(remember)
        self.l2.register_forward_pre_hook(scale_inputs)
        self.counter = HookCounter()
        self.l2.register_forward_hook(self.counter)

    def forward(self, x):
        self.calls += 1
        h = torch.tanh(self.l1(x))
        self.scratch.add_(h.detach().mean(0))
        self.features = h
        self.seen.append(1)
        out = self.l2(h) * self.scale
        self.scale.mul_(1.5)  # used before it changes: each call starts from the user's
        return out


class HookCounter:
    """A forward hook object with state of its own."""

    def __init__(self):
        self.count = 0

    def __call__(self, module, inputs, output):
        self.count += 1


def stateful_net(seed: int = 26) -> nn.Module:
    return reinit(StatefulNet(), seed, gain=2.0).eval()


class GraphNet(nn.Module):
    """A graph convolution over 6 nodes whose normalised adjacency is a sparse COO buffer
    (as GCN code stores it), then a linear layer, mean over nodes and a linear head."""

    def __init__(self, nodes: int = 6, features: int = 5, hidden: int = 8, classes: int = 3):
        super().__init__()
        ring = [(i, (i + d) % nodes) for i in range(nodes) for d in (-1, 0, 1)]
        index = torch.tensor(ring).T
        self.register_buffer("adj", torch.sparse_coo_tensor(
            index, torch.full((index.shape[1],), 1 / 3), (nodes, nodes)).coalesce())
        self.lin = nn.Linear(features, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        b, n, f = x.shape
        mixed = torch.sparse.mm(self.adj, x.transpose(0, 1).reshape(n, b * f))
        h = torch.tanh(self.lin(mixed.reshape(n, b, f).transpose(0, 1)))
        return self.head(h.mean(1))


def graph_net(seed: int = 27) -> nn.Module:
    return reinit(GraphNet(), seed, gain=1.5)


# --- data --------------------------------------------------------------------------------
def mlp_data():
    return classification_data(40, (10,), 4, seed=10)


def tied_data():
    return classification_data(30, (8,), 3, seed=11)


def cnn_data():
    return classification_data(24, (3, 8, 8), 5, seed=12)


def resnet_data():
    return classification_data(2, (3, 32, 32), 10, seed=13)


class PairDataset(Dataset):
    """A map-style dataset of ``(tensor, int)`` items (not a TensorDataset)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def wrap_data(x, y, how: str):
    """Present ``(x, y)`` as the API input named by ``how``."""
    if how == "tensors":
        return (x, y)
    if how == "dataset":
        return PairDataset(x, y)
    if how == "tensor_dataset":
        return TensorDataset(x, y)
    if how == "loader":
        return DataLoader(TensorDataset(x, y), batch_size=7, shuffle=False)
    if how == "loader_shuffled":
        g = torch.Generator().manual_seed(99)
        return DataLoader(TensorDataset(x, y), batch_size=7, shuffle=True, generator=g)
    raise ValueError(how)


def seq_data():
    return classification_data(24, (6, 5), 3, seed=14)


def mlp6_data():
    return classification_data(32, (6,), 3, seed=15)


def class_sorted_cnn_data(n: int = 60):
    """Images sorted by class, as ``ImageFolder`` yields them: BatchNorm batch statistics
    then depend strongly on which samples share a batch."""
    g = torch.Generator().manual_seed(16)
    y = torch.sort(torch.randint(0, 5, (n,), generator=g)).values
    x = torch.randn((n, 3, 8, 8), generator=g) + 0.8 * y.float().reshape(-1, 1, 1, 1)
    return x, y


# --- directions made by the tests ------------------------------------------------------
def gaussian_direction(model: nn.Module, seed: int, scale: float = 0.5) -> dict:
    """A direction on every parameter (biases and BN too), entries N(0, (scale * rms(theta))^2).

    Built without the library, so the engine is also checked on coordinates that move
    1-D tensors (which filter-normalised directions with ``ignore="biasbn"`` leave alone).
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, p in model.named_parameters():
        rms = float(p.detach().pow(2).mean().sqrt()) or 1.0
        out[k] = scale * rms * torch.randn(p.shape, generator=g, dtype=p.dtype)
    return out


# --- losses ------------------------------------------------------------------------------
def mse_softmax(outputs, targets):
    """loss-landscape's ``mse`` option: softmax outputs against one-hot targets."""
    onehot = F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
    return F.mse_loss(outputs.softmax(-1), onehot)


# --- cases -------------------------------------------------------------------------------
NONSQUARE = {"x": (-1.0, 1.0, 7), "y": (-0.5, 0.75, 5), "curve_x": (-1.0, 1.5, 9)}
SMALL = {"x": (-0.1, 0.1, 3), "y": (-0.1, 0.1, 3), "curve_x": (-0.1, 0.1, 3)}


def _case(name, model, data, **kw):
    case = {
        "name": name,
        "model": model,
        "data": data,
        "wrap": "tensors",
        "loss_fn": None,
        "metrics": ("loss", "accuracy"),
        "bn": "eval",
        "train_mode": False,
        "strategies": ALL_STRATEGIES,
        "dtype": torch.float32,
        **NONSQUARE,
    }
    case.update(kw)
    return case


CASES = [
    _case("mlp", mlp, mlp_data),
    _case("mlp-dataset", mlp, mlp_data, wrap="dataset"),
    _case("mlp-tensordataset", mlp, mlp_data, wrap="tensor_dataset", strategies=("auto",)),
    _case("mlp-loader", mlp, mlp_data, wrap="loader"),
    _case("mlp-loader-shuffled", mlp, mlp_data, wrap="loader_shuffled"),
    _case("mlp-mse", mlp, mlp_data, loss_fn=mse_softmax, metrics=("loss",)),
    _case("mlp-dropout", mlp_dropout, mlp_data),
    _case("mlp-dropout-train-mode", mlp_dropout, mlp_data, train_mode=True),
    _case("tied", tied_mlp, tied_data),
    _case("cnn-bn-res", bn_res_cnn, cnn_data),
    _case("cnn-bn-res-train-mode", bn_res_cnn, cnn_data, train_mode=True, strategies=("auto",)),
    _case("cnn-bn-res-batch", bn_res_cnn, cnn_data, bn="batch"),
    _case("cnn-bn-res-batch-loader", bn_res_cnn, cnn_data, bn="batch", wrap="loader_shuffled",
          strategies=("auto",)),
    # resnet18 runs with the automatic plan and point by point, not with strategy="vmap":
    # forcing vmap makes the tuner time passes of up to 256 points (~150 s for 9 points).
    _case("resnet18", resnet18, resnet_data, strategies=("auto", "loop"), **SMALL),
    # Batch statistics of 2 samples at layer4's 1x1 feature maps are ill-conditioned: a plain
    # float32 forward differs from float64 by ~1e-3 relative. In float64 the engine must match
    # the oracle to 1e-5 like every other case.
    _case("resnet18-batch-fp64", resnet18, resnet_data, bn="batch", strategies=("loop",),
          dtype=torch.float64, **SMALL),
]

# Models researchers bring (issue 14), each against the float64 oracle and a full-state
# snapshot. ``vmap_fails``: the vmap path cannot run them, so the plan must say why.
# ``oracle_dtype``: fake quantisation only runs in float32. ``template``: a fresh model
# for the oracle where deepcopy of the user's model is refused (legacy weight_norm).
REAL_CASES = [
    _case("lstm", lstm_net, seq_data, vmap_fails=True, **SMALL),
    _case("gru", gru_net, seq_data, vmap_fails=True, **SMALL),
    _case("transformer", transformer, seq_data, **SMALL),
    _case("qat", qat_mlp, mlp6_data, vmap_fails=True, oracle_dtype=torch.float32, **SMALL),
    _case("parametrizations", parametrized_mlp, mlp6_data, **SMALL),
    _case("legacy-weight-norm", legacy_weight_norm_mlp, mlp6_data, template=True, **SMALL),
    _case("stateful-hooks", stateful_net, mlp6_data, vmap_fails=True, **SMALL),
    _case("resnet18-bn", resnet18, resnet_data, **SMALL),
    _case("cnn-bn-class-sorted-batch", bn_res_cnn, class_sorted_cnn_data, bn="batch",
          bn_batch_size=16, **SMALL),
    _case("graph-sparse-buffer", graph_net, seq_data, **SMALL),
]
REAL_CASE_IDS = [c["name"] for c in REAL_CASES]

CASE_IDS = [c["name"] for c in CASES]

STRATEGY_CASES = [(c, s) for c in CASES for s in c["strategies"]]
STRATEGY_CASE_IDS = [f"{c['name']}-{s}" for c, s in STRATEGY_CASES]


def build(case):
    """A fresh ``(model, x, y, data)`` for ``case`` (the model in the case's mode)."""
    model = case["model"]().to(case["dtype"])
    x, y = case["data"]()
    x = x.to(case["dtype"])
    if case["train_mode"]:
        model.train()
    else:
        model.eval()
    return model, x, y, wrap_data(x, y, case["wrap"])


def engine_options(case, strategy: str, n: int) -> dict:
    """``evaluator_options`` for ``case``: the strategy; for bn="batch" one BatchNorm batch
    of all data (``bn_batch_size=n``), the oracle's default."""
    opts = {}
    if strategy != "auto":
        opts["strategy"] = strategy
    if case["bn"] == "batch":
        opts["bn_batch_size"] = case.get("bn_batch_size") or n
    return opts


# --- tasks: outputs, losses and metrics beyond classification (issue 14, items 4-6) --------
# A task case: ``model``/``data`` factories, the engine's ``loss_fn``, ``metrics`` and
# ``output_fn``, and ``oracle``: ``{name: fn(outputs, targets) -> float}`` on all data in
# float64, written without the engine's code (tests/oracle.py's naive_values). ``batches``
# are forced engine batch sizes (None: the engine's choice); each must give the oracle's
# values, which is what "exact over all data" means for a batched engine.
class Regressor(nn.Module):
    def __init__(self, outputs: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, outputs))

    def forward(self, x):
        return self.net(x)


def regression_data(outputs: int):
    def data():
        g = torch.Generator().manual_seed(20 + outputs)
        x = torch.randn(30, 5, generator=g)
        return x, torch.sin(x[:, :outputs] * 2) + 0.1 * torch.randn(30, outputs, generator=g)
    return data


def multilabel_data():
    g = torch.Generator().manual_seed(23)
    x = torch.randn(36, 10, generator=g)
    return x, (torch.rand(36, 4, generator=g) < 0.4).float()


class TokenTagger(nn.Module):
    """Embedding + one Transformer encoder layer + per-token head: ``(N, T, C)`` logits."""

    def __init__(self, vocab: int = 20, d: int = 16, classes: int = 5, channels_first=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.TransformerEncoderLayer(d, 2, dim_feedforward=32, dropout=0.0,
                                              batch_first=True)
        self.head = nn.Linear(d, classes)
        self.channels_first = channels_first

    def forward(self, tokens):
        logits = self.head(self.enc(self.emb(tokens)))
        return logits.transpose(1, 2) if self.channels_first else logits  # (N, C, T)


def token_data(ignore: int = -100):
    def data():
        g = torch.Generator().manual_seed(24)
        tokens = torch.randint(0, 20, (26, 6), generator=g)
        tags = torch.randint(0, 5, (26, 6), generator=g)
        tags[torch.rand(26, 6, generator=g) < 0.3] = ignore
        tags[:3] = ignore  # the first batches of 2 hold only ignored targets
        return tokens, tags
    return data


class DictOut(nn.Module):
    """HuggingFace style: ``{"logits": ..., "hidden": ...}``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 16), nn.Tanh())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.body(x)
        return {"logits": self.head(h), "hidden": h}


class TupleOut(DictOut):
    def forward(self, x):
        out = super().forward(x)
        return out["hidden"], out["logits"]  # the logits are not first


def token_ce(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def per_sequence_ce(out, y):
    """Mean over sequences of each sequence's mean over its counted tokens (not per token)."""
    per = F.cross_entropy(out.transpose(1, 2), y, reduction="none")  # 0 where ignored
    return (per.sum(1) / (y != -100).sum(1).clamp(min=1)).mean()


def masked_accuracy(class_dim: int, ignore: int):
    def acc(out, y):
        counted = y != ignore
        return float((out.argmax(class_dim) == y)[counted].double().mean())
    return acc


def dict_ce(out, y):
    return F.cross_entropy(out["logits"], y)


def top2_per_sample(out, y):
    """A user metric returning per-sample values (B,)."""
    logits = out["logits"] if isinstance(out, dict) else out
    return (logits.topk(2, -1).indices == y[:, None]).any(-1).double()


def token_hits(out, y):
    """A user metric returning (total, count): correct tokens over counted tokens."""
    counted = y != -100
    return ((out.argmax(-1) == y) & counted).sum(), counted.sum()


def _task(name, model, data, loss_fn, oracle, **kw):
    case = {"name": name, "model": model, "data": data, "loss_fn": loss_fn, "oracle": oracle,
            "metrics": tuple(oracle), "output_fn": None, "batches": (None, 4),
            "strategies": ("vmap", "loop"), **kw}
    return case


def _mse(out, y):
    return F.mse_loss(out, y)


TASK_CASES = [
    _task("regression-1", lambda: reinit(Regressor(1), 30), regression_data(1), _mse,
          {"loss": _mse}),
    _task("regression-3", lambda: reinit(Regressor(3), 31), regression_data(3),
          nn.MSELoss(), {"loss": F.mse_loss}),
    _task("multilabel-bce", lambda: reinit(nn.Sequential(
        nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4)), 32, gain=2.0), multilabel_data,
          nn.BCEWithLogitsLoss(),
          {"loss": F.binary_cross_entropy_with_logits,
           "accuracy": lambda o, y: float(((o > 0) == (y > 0.5)).double().mean())}),
    _task("binary-one-logit", lambda: reinit(nn.Sequential(
        nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1), nn.Flatten(0)), 37, gain=2.0),
          lambda: (multilabel_data()[0], multilabel_data()[1][:, 0]), nn.BCEWithLogitsLoss(),
          {"loss": F.binary_cross_entropy_with_logits,
           "accuracy": lambda o, y: float(((o > 0) == (y > 0.5)).double().mean())}),
    _task("tokens-ignore-100", lambda: reinit(TokenTagger(), 33), token_data(), token_ce,
          {"loss": token_ce, "accuracy": masked_accuracy(-1, -100)}, batches=(None, 2, 5)),
    _task("tokens-per-sequence-mean", lambda: reinit(TokenTagger(), 33), token_data(),
          per_sequence_ce, {"loss": per_sequence_ce, "accuracy": masked_accuracy(-1, -100)},
          batches=(None, 2, 5)),
    _task("tokens-module-ignore-index", lambda: reinit(TokenTagger(channels_first=True), 34),
          token_data(ignore=7), nn.CrossEntropyLoss(ignore_index=7),
          {"loss": nn.CrossEntropyLoss(ignore_index=7), "accuracy": masked_accuracy(1, 7)},
          batches=(None, 2)),
    _task("tokens-user-metric", lambda: reinit(TokenTagger(), 33), token_data(), token_ce,
          {"loss": token_ce, "token_acc": masked_accuracy(-1, -100)},
          metrics={"loss": None, "token_acc": token_hits}, batches=(3,)),
    _task("class-weights-ignore", mlp, lambda: _with_ignored(mlp_data()),
          nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0, 3.0])),
          {"loss": nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0, 3.0])),
           "accuracy": masked_accuracy(-1, -100)}, batches=(None, 3)),
    _task("dict-outputs", lambda: reinit(DictOut(), 35), mlp_data,
          lambda out, y: F.cross_entropy(out["logits"], y),
          {"loss": lambda out, y: F.cross_entropy(out["logits"], y),
           "accuracy": lambda o, y: float((o["logits"].argmax(-1) == y).double().mean()),
           "top2": lambda o, y: float(top2_per_sample(o, y).mean())},
          metrics={"loss": None, "accuracy": None, "top2": top2_per_sample}),
    _task("tuple-outputs", lambda: reinit(TupleOut(), 36), mlp_data,
          lambda out, y: F.cross_entropy(out[1], y),
          {"loss": lambda out, y: F.cross_entropy(out[1], y),
           "accuracy": lambda o, y: float((o[1].argmax(-1) == y).double().mean())},
          output_fn=lambda out: out[1]),
]
TASK_IDS = [c["name"] for c in TASK_CASES]


def _with_ignored(data):
    x, y = data
    y = y.clone()
    y[::3] = -100
    return x, y
