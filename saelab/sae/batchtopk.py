"""BatchTopK (Bussmann, Leask, Nanda 2024): the k·B largest pre-activations of the whole batch, so a token uses as
many latents as it needs and the batch's mean L0 is exactly k. Inference is batch-independent: a JumpReLU at a
global threshold θ learned during training as an EMA of the smallest value kept in each batch (dictionary_learning);
until θ is learned (θ < 0), `encode` falls back to per-token TopK. SAELens sees it as JumpReLU + `threshold`.

The EMA lags: while training the batch cut-off keeps falling, so after a short run θ sits above it and thresholded
inference fires far fewer than k latents per token (0.96 vs a final cut of 0.79 and L0 12 instead of 32 after 1M
tokens). So after the last step θ is calibrated once on `calibration_tokens` further training tokens: it is set to
the BatchTopK cut-off of that whole sample (its (k·N)-th largest pre-activation), which makes the mean L0 of the
finished SAE on training data k.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from saelab.distributed import rank_world
from saelab.kernels.topk_stream import streaming_topk
from saelab.sae.architectures import (Architecture, ThresholdOptions, calibration_inputs, threshold_indices,
                                      topk_indices)
from saelab.sae.batch_select import (RunningTop, batch_topk_indices, batch_topk_streaming, preact_blocks,
                                     threshold_streaming)
from saelab.sae.latent_shard import batch_count


class BatchTopK(Architecture):
    name = "batchtopk"
    help = "BatchTopK (Bussmann et al. 2024): top k·B over the batch; inference by a learned global threshold"
    Options = ThresholdOptions
    streams = True  # the global top k·B in blocks (`saelab.sae.batch_select`)
    latent_sharding = "batch"  # its collectives span every rank: each shard's entries join the batch's cut

    def init_state(self, sae) -> None:
        # one value per latent (all equal here) so the buffer is SAELens's JumpReLU `threshold` as it is; -1: unset
        sae.register_buffer("threshold", torch.full((self.cfg.n_latents,), -1.0, device=sae.W_dec.device))

    def select(self, sae, pre, grad, k):
        return batch_topk_indices(pre, k, batch_count(sae))

    def select_streaming(self, sae, x_c, grad, k):
        return batch_topk_streaming(x_c, sae.W_enc, sae.b_enc, k, self.cfg.encoder_chunk, batch_count(sae))

    def select_inference(self, sae, pre, grad):
        if float(sae.threshold[0]) < 0:  # not learned yet
            return topk_indices(pre, self.cfg.k), None
        return threshold_indices(pre, sae.threshold)

    def select_inference_streaming(self, sae, x_c, grad):
        chunk = self.cfg.encoder_chunk
        if float(sae.threshold[0]) < 0:
            return *streaming_topk(x_c, sae.W_enc, sae.b_enc, self.cfg.k, chunk), None
        return threshold_streaming(x_c, sae.W_enc, sae.b_enc, sae.threshold, chunk)

    @torch.no_grad()
    def after_step(self, sae, out, step: int) -> None:
        if step < self.opt.threshold_start_step:
            return
        kept = out.code.values.detach()
        m = kept[kept > 0].min() if bool((kept > 0).any()) else kept.new_tensor(float("inf"))
        if rank_world()[1] > 1:  # the batch is global: its minimum too
            dist.all_reduce(m, op=dist.ReduceOp.MIN)
        if not torch.isfinite(m):
            return
        if float(sae.threshold[0]) < 0:
            sae.threshold.fill_(float(m))
        else:
            mom = self.opt.threshold_momentum
            sae.threshold.mul_(mom).add_((1 - mom) * m.to(sae.threshold.dtype))

    calibrates = True

    @torch.no_grad()
    def calibrate(self, sae, draw, target_l0: float | None = None, tokens: int | None = None) -> dict:
        """θ ← the (L·N)-th largest pre-activation of N more training tokens (all ranks' under torch.distributed),
        L = target_l0 (default k), exactly: a `RunningTop` of the L·N largest over the sample's batches (and blocks
        of latents with the streaming encoder)."""
        batches, k = batch_count(sae), self.cfg.k if target_l0 is None else target_l0
        xs = calibration_inputs(sae, draw, self.opt.calibration_tokens if tokens is None else tokens)
        if not xs:
            return {}
        n_tok = sum(x.shape[0] for x in xs)
        top = RunningTop(max(1, round(k * n_tok * batches)), sae.W_enc.dtype, sae.W_enc.device)
        for x in xs:  # with the streaming encoder, in blocks of latents
            for s, pre in preact_blocks(x - sae.b_pre, sae.W_enc, sae.b_enc, self.cfg.encoder_chunk)():
                top.add(pre, s)
        cut = float(top.cut())
        if cut <= 0:  # fewer than k positive pre-activations per token: no threshold gives L0 = k
            return {}
        ema = float(sae.threshold[0])
        sae.threshold.fill_(cut)
        return {"threshold_ema": ema, "threshold": cut, "tokens": n_tok * batches}

    def saelens_export(self, sae) -> dict:
        if float(sae.threshold[0]) < 0:  # θ not learned yet: inference is TopK, so tell SAELens the same
            return super().saelens_export(sae)
        return {"architecture": "jumprelu", "cfg": {}, "tensors": {"threshold": sae.threshold.detach()}}


ARCHITECTURE = BatchTopK
