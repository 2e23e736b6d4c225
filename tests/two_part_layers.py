"""Toy layers for the checkpointing tests: an attention-like part and an MLP-like part per layer, the MLP's
two halves side by side in one product as the fused gate/up lie."""
import torch


class SideBySide(torch.autograd.Function):
    """h + g * u for g, u the two halves of one product h V (as the fused gate/up): saves the views, and its
    backward records whether they still share one tensor's memory."""
    shared = []

    @staticmethod
    def forward(ctx, h, gu):
        g, u = gu[:, : h.shape[1]], gu[:, h.shape[1]:]
        ctx.save_for_backward(g, u)
        return h + g * u

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        SideBySide.shared.append(g.untyped_storage().data_ptr() == u.untyped_storage().data_ptr())
        return dy, torch.cat((dy * u, dy * g), 1)


class TwoPartLayers:
    """Layers of an attention-like part and an MLP-like part; counts how often each MLP part runs."""

    def __init__(self, n=4, width=8, device="cpu"):
        self.W = [torch.nn.Parameter(torch.randn(width, width, device=device) / width ** 0.5) for _ in range(n)]
        self.V = [torch.nn.Parameter(torch.randn(width, 2 * width, device=device) / width ** 0.5) for _ in range(n)]
        self.mlp_runs = [0] * n

    def parts(self, i):
        def attention(h, context):
            return h + torch.tanh(h @ self.W[i])

        def mlp(h, context):
            self.mlp_runs[i] += 1
            return SideBySide.apply(h, h @ self.V[i])
        return [(attention, [self.W[i]]), (mlp, [self.V[i]])]

    def grads(self, ckpt, x):
        h = x
        for i in range(len(self.W)):
            h = ckpt(i, h, self.parts(i))
        return torch.autograd.grad((h ** 2).sum(), [x, *self.W, *self.V])
