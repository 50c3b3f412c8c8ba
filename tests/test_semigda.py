"""SemiGDA (``semigda``): VAE loading (diffusers folder, safetensors, LDM ckpt, strict keys), widths
from the VAE config, the frozen VAE, the mask encoding, the loss pieces, the refusals, and the CLI
end to end (2D, with stock nnU-Net prediction). Every VAE here is a tiny random ``AutoencoderKL``
saved to a temporary folder and loaded through the plugin's loader; nothing is downloaded."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")

from semidiff_nnunet.errors import SemidiffError  # noqa: E402
from semidiff_nnunet.plugins.semigda import networks as N  # noqa: E402
from semidiff_nnunet.plugins.semigda import trainer as T  # noqa: E402
from semidiff_nnunet.plugins.semigda import vae as V  # noqa: E402

TINY_VAE = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)


def tiny_vae(seed: int = 0, **kw):
    from diffusers import AutoencoderKL

    cfg = {**TINY_VAE, **kw}
    n = len(cfg["block_out_channels"])
    torch.manual_seed(seed)
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, **cfg)


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_vae")
    tiny_vae().save_pretrained(folder)
    return folder


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------- loading
def test_load_diffusers_folder_is_frozen(vae_folder):
    vae = V.load_vae(vae_folder)
    assert _same_weights(vae, tiny_vae())
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
    assert list(vae.config.block_out_channels) == [8, 16]


def test_ldm_key_conversion_matches_diffusers_converter():
    """Our LDM names (diffusers → LDM) are those diffusers' own converter maps back exactly, and our
    LDM → diffusers conversion inverts them."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = tiny_vae()
    state = vae.state_dict()
    ldm = V.diffusers_to_ldm(state)
    assert any(k.startswith("decoder.up.1.upsample") for k in ldm) and "encoder.mid.attn_1.q.weight" in ldm
    theirs = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert theirs.keys() == state.keys()
    assert all(torch.equal(theirs[k].reshape(state[k].shape), state[k]) for k in state)
    ours = V.ldm_to_diffusers(ldm)
    assert ours.keys() == state.keys() and all(torch.equal(ours[k], state[k]) for k in state)


def test_load_ldm_ckpt_and_single_safetensors(tmp_path, vae_folder):
    from safetensors.torch import save_file

    ref = tiny_vae()
    ldm = V.diffusers_to_ldm(ref.state_dict())
    # the authors' format, with the whole-SD prefix and a VAE-training loss key that is dropped
    ckpt = tmp_path / "ckpt" / "first-stage.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {**{"first_stage_model." + k: v for k, v in ldm.items()},
                               "first_stage_model.loss.logvar": torch.zeros(())}}, ckpt)
    (ckpt.parent / "config.json").write_text((vae_folder / "config.json").read_text())
    assert _same_weights(V.load_vae(ckpt), ref)
    # a single LDM-named safetensors file without a config: the architecture is read off the shapes
    single = tmp_path / "single" / "vae.safetensors"
    single.parent.mkdir()
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(single))
    cfg = V.config_from_diffusers_state(V.ldm_to_diffusers(ldm))
    assert cfg["block_out_channels"] == [8, 16] and cfg["layers_per_block"] == 1 and cfg["latent_channels"] == 4
    # SD's 32 groups do not divide 8 channels: with a config.json next to it the file loads
    with pytest.raises(SemidiffError):
        V.load_vae(single)
    (single.parent / "config.json").write_text((vae_folder / "config.json").read_text())
    assert _same_weights(V.load_vae(single), ref)


@pytest.mark.parametrize("damage", ["missing", "unexpected", "renamed", "shape"])
def test_wrong_weights_are_refused(tmp_path, vae_folder, damage):
    ldm = V.diffusers_to_ldm(tiny_vae().state_dict())
    if damage == "missing":
        del ldm["decoder.up.0.block.0.conv1.weight"]
    elif damage == "unexpected":
        ldm["encoder.extra.weight"] = torch.zeros(1)
    elif damage == "renamed":
        ldm["encoder.down.0.block.0.conv9.weight"] = ldm.pop("encoder.down.0.block.0.conv1.weight")
    else:
        ldm["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    path = tmp_path / "vae.ckpt"
    torch.save({"state_dict": ldm}, path)
    (tmp_path / "config.json").write_text((vae_folder / "config.json").read_text())
    with pytest.raises(SemidiffError) as info:
        V.load_vae(path)
    msg = str(info.value)
    assert "vae=" in msg and msg.count(". ") <= 1 and "\n" not in msg


def test_missing_extra_names_the_install(monkeypatch, vae_folder):
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if the extra were not installed
    for call in (V.require_diffusers, lambda: V.load_vae(vae_folder)):
        with pytest.raises(SemidiffError, match=r'pip install -e "\.\[semigda\]"'):
            call()


def test_bad_paths_are_refused(tmp_path):
    for path, expect in (("", "give their local path"), (tmp_path / "nowhere", "does not exist"),
                         (tmp_path, "not a diffusers AutoencoderKL folder")):
        with pytest.raises(SemidiffError, match=expect) as info:
            V.load_vae(path)
        assert "vae=" in str(info.value)


# ---------------------------------------------------------------------------------------------- widths
def test_mapping_attention_is_gms_softmax_attention_without_the_n_by_n_weights():
    """The mapping model's attention equals softmax(q kᵀ/√c) v written out, and its peak memory on many
    latent positions stays far below the n × n weight matrix the explicit form holds."""
    torch.manual_seed(0)
    att = N._SpatialSelfAttention(8, 4)
    x = torch.randn(2, 8, 6, 5)
    h = att.norm(x)
    q, k, v = (f(h).flatten(2) for f in (att.q, att.k, att.v))  # b, c, n
    w = torch.softmax(torch.bmm(q.transpose(1, 2), k) * 8 ** -0.5, dim=2)
    explicit = x + att.proj_out(torch.bmm(v, w.transpose(1, 2)).view(2, 8, 6, 5))
    assert torch.allclose(att(x), explicit, atol=1e-5)

    big = torch.randn(1, 8, 96, 96)  # n = 9216: n × n float weights would be 324 MiB
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                 profile_memory=True) as prof:
        att(big)
    peak = max(e.cpu_memory_usage for e in prof.key_averages())
    assert peak < 9216 * 9216 * 4 / 4, peak


def test_widths_follow_the_vae_config():
    for cfg in (dict(block_out_channels=(8, 16)), dict(block_out_channels=(16, 32, 32), latent_channels=3)):
        vae = tiny_vae(**cfg)
        widths = list(cfg["block_out_channels"])
        z = cfg.get("latent_channels", 4)
        net = N.SemiGDANet(vae, 3)
        assert net.mapping.input_blocks.in_channels == z and net.mapping.out[-1].out_channels == z
        enc = [b.resblock.conv2[-1].out_channels for b in net.mapping.encoder]
        assert enc == [max(widths[0] // 4, 1) * (w // widths[0]) for w in widths]
        assert [a.out_channels for a in net.adapters_vae] == widths[::-1] == [a.out_channels for a in net.adapters_cnn]
        assert [a.in_channels for a in net.adapters_cnn] == [2 * w for w in widths[::-1]]
        assert net.resnet.conv_out[-1].out_channels == 2 * z
        x = torch.randn(2, 1, 16, 16)
        out, skips = net.resnet(N.to_rgb(x))
        assert [s.shape[1] for s in skips] == widths and out.shape[-1] == 16 // 2 ** (len(widths) - 1)
        _, vae_skips = N.encode_with_skips(vae, N.to_rgb(x))
        assert [s.shape for s in vae_skips] == [s.shape for s in skips]


def test_sd_config_gives_the_authors_widths():
    """On SD's config (meta tensors, no weights): GMS's 32·[1,2,4,4] mapping model, Jump adapters
    512, 512, 256, 128, the ResNet's 128/256/512/512 skips and 3-4-6 blocks."""
    with torch.device("meta"):
        vae = tiny_vae(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
        net = N.SemiGDANet(vae, 2)
    assert [b.resblock.conv2[-1].out_channels for b in net.mapping.encoder] == [32, 64, 128, 128]
    assert net.mapping.input_blocks.out_channels == 32 and net.mapping.groups == 16
    assert [b.resblock.conv1[-1].in_channels for b in net.mapping.decoder] == [256, 192, 96, 64]
    assert [a.out_channels for a in net.adapters_vae] == [512, 512, 256, 128]
    assert [len(layer) for layer in net.resnet.layers] == [3, 4, 6]
    assert [layer[0].conv1.out_channels for layer in net.resnet.layers] == [256, 512, 512]
    assert net.scale == pytest.approx(0.18215) and net.downsampling == 8


class _FirstHalf(torch.nn.Module):
    """An adapter that ignores the skip: adapter(cat(h, skip), temb) = h."""

    def forward(self, x, temb=None):
        return x[:, : x.shape[1] // 2]


def test_branches_match_diffusers_encode_and_decode(vae_folder):
    """The encoder with skips is diffusers' encode; the decoder with adapters that ignore the skips
    is diffusers' decode; latents are mean × scaling_factor and decoding divides it back."""
    vae = V.load_vae(vae_folder)
    net = N.SemiGDANet(vae, 3).eval()
    x = torch.randn(2, 1, 16, 16)
    x_rgb = net.vae_input(x)
    ref = vae.encode(x_rgb).latent_dist
    mean, std, _ = net.image_latent(x_rgb)
    assert net.scale == pytest.approx(0.18215)
    assert torch.allclose(mean, ref.mean * 0.18215, atol=1e-6) and torch.allclose(std, ref.std * 0.18215, atol=1e-6)
    z_r, _ = net.cnn_latent(x_rgb)
    out, _ = net.resnet(x_rgb)
    assert torch.allclose(z_r, vae.quant_conv(out).chunk(2, 1)[0] * 0.18215)
    # the skips are the outputs of the encoder's last res block per level
    seen = []
    hooks = [down.resnets[-1].register_forward_hook(lambda m, i, o: seen.append(o)) for down in vae.encoder.down_blocks]
    vae.encode(x_rgb)
    for h in hooks:
        h.remove()
    skips = N.encode_with_skips(vae, x_rgb)[1]
    assert len(skips) == len(seen) == 2 and all(torch.equal(a, b) for a, b in zip(skips, seen))
    ident = torch.nn.ModuleList(_FirstHalf() for _ in net.adapters_vae)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        decoded = vae.decode(z).sample
        assert torch.allclose(N.decode_with_adapters(vae, z, skips, ident), decoded, atol=1e-5)
        assert torch.allclose(net.decode(z * net.scale, skips, ident), N.decode_mask(decoded, 3), atol=1e-4)
    assert torch.allclose(N.encode_mask(torch.zeros(1, 16, 16, dtype=torch.long), 3), -torch.ones(1, 3, 16, 16))


def test_vae_runs_in_float32_under_autocast(vae_folder):
    """SD's VAE config asks for float32 (force_upcast): under mixed precision the frozen encoder and
    decoder run in float32, the trainable branches in the autocast type."""
    net = N.SemiGDANet(V.load_vae(vae_folder), 2)
    assert net.vae.config.force_upcast
    dtypes = {}
    def record(name):
        def hook(module, args, output):
            dtypes.setdefault(name, output.dtype)  # returns None: the output is kept

        return hook

    hooks = [m.register_forward_hook(record(n))
             for n, m in (("enc", net.vae.encoder.conv_in), ("dec", net.vae.decoder.conv_out),
                          ("resnet", net.resnet.conv1[0]))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net.branches(torch.randn(1, 1, 16, 16))
    for h in hooks:
        h.remove()
    assert dtypes == {"enc": torch.float32, "dec": torch.float32, "resnet": torch.bfloat16}
    assert out["vae_prob"].dtype == torch.float32


# ---------------------------------------------------------------------------------------------- encodings
@pytest.mark.parametrize("k", [2, 3, 4, 7])
def test_mask_encoding_round_trip_is_exact(k):
    labels = torch.arange(k).repeat(2, 3, 1)  # every class
    enc = N.encode_mask(labels, k)
    assert enc.shape == (2, 3, 3, k) and enc.min() == -1 and enc.max() == 1
    probs = N.decode_mask(enc, k)
    assert torch.equal(probs, torch.nn.functional.one_hot(labels, k).permute(0, 3, 1, 2).float())


def test_two_classes_equal_the_authors_acr():
    labels = torch.randint(0, 2, (2, 8, 8))
    assert torch.equal(N.encode_mask(labels, 2), (2.0 * labels - 1)[:, None].expand(-1, 3, -1, -1))
    decoded = torch.randn(2, 3, 8, 8) * 2
    theirs = ((decoded.mean(1) + 1) / 2).clamp(0, 1)
    probs = N.decode_mask(decoded, 2)
    assert torch.allclose(probs[:, 1], theirs, atol=1e-5) and torch.allclose(probs.sum(1), torch.ones(2, 8, 8))


def test_channel_and_range_rules():
    x = torch.randn(2, 4, 5, 5)
    rgb = N.to_rgb(x)
    assert torch.allclose(rgb[:, 0], (x[:, 0] + x[:, 3]) / 2) and torch.equal(rgb[:, 1], x[:, 1])
    assert torch.equal(N.to_rgb(x[:, :1]), x[:, :1].expand(-1, 3, -1, -1))
    assert torch.equal(N.to_rgb(x[:, :3]), x[:, :3])
    assert torch.allclose(N.to_rgb(x[:, :2])[:, 2], x[:, :2].mean(1))
    assert torch.equal(N.to_vae_range(torch.tensor([0.0, 0.5, 1.0]), "rgb01"), torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.equal(N.to_vae_range(torch.tensor([-6.0, 1.5, 9.0]), "zscore"), torch.tensor([-1.0, 0.5, 1.0]))


# ---------------------------------------------------------------------------------------------- losses
def test_loss_pieces():
    labels = torch.tensor([[[0, 1], [2, 1]]])
    onehot = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    assert T.soft_dice_loss(onehot, labels).item() == pytest.approx(0, abs=1e-6)
    assert T.soft_dice_loss(onehot.roll(1, 1), labels).item() == pytest.approx(1, abs=1e-4)
    # binary: foreground iff p^(1/0.1) >= 0.5, i.e. p >= 0.5^0.1 = 0.933
    p = torch.tensor([0.94, 0.92, 0.5, 0.0]).view(1, 1, 1, 4)
    probs = torch.cat([1 - p, p], 1)
    assert T.sharpened_pseudo_labels(probs).tolist() == [[[1, 0, 0, 0]]]
    # eq. 5-6: each unlabeled latent learns towards the other's detached latent
    v, c, g = (torch.randn(4, 2, 3, 3, requires_grad=True) for _ in range(3))
    sup, unsup = T.latent_alignment(v, c, g[:2].detach(), 2)
    assert sup.item() == pytest.approx(((v[:2] - g[:2]) ** 2).mean().item() + ((c[:2] - g[:2]) ** 2).mean().item(),
                                       rel=1e-5)
    gv, gc = torch.autograd.grad(unsup, (v, c))
    assert torch.allclose(gv[2:], 2 * (v[2:] - c[2:]).detach() / v[2:].numel()) and not gv[:2].any()
    assert torch.allclose(gc[2:], 2 * (c[2:] - v[2:]).detach() / c[2:].numel()) and not gc[:2].any()
    # Dice on the foreground classes only (the authors' single foreground map): p_fg = 0.5 on an
    # all-foreground patch gives 1 - 2·0.5/(0.5 + 1) = 1/3 (with background it would be 2/3)
    half = torch.full((1, 2, 4, 4), 0.5)
    assert T.soft_dice_loss(half, torch.ones(1, 4, 4, dtype=torch.long)).item() == pytest.approx(1 / 3, abs=1e-4)


def test_copy_paste_targets():
    """Both mixes of one box; each branch's target takes the other branch's pseudo labels."""
    from semidiff_nnunet.networks.mixing import random_box_mask

    x_l, x_u = torch.zeros(2, 1, 6, 6), torch.ones(2, 1, 6, 6)
    y = torch.full((2, 6, 6), 1)
    pl_v, pl_r = torch.full((2, 6, 6), 2), torch.full((2, 6, 6), 3)
    box = random_box_mask(2, (6, 6), 2 / 3, shared=True)
    images, t_v, t_r = T.copy_paste_batch(x_l, y, x_u, pl_v, pl_r, box)
    inside = box[:, 0]
    assert images.shape == (4, 1, 6, 6) and inside.sum() == 2 * 16
    assert torch.equal(images[:2, 0], inside.float()) and torch.equal(images[2:, 0], (~inside).float())
    assert torch.equal(t_v[:2], torch.where(inside, 3, 1)) and torch.equal(t_v[2:], torch.where(inside, 1, 3))
    assert torch.equal(t_r[:2], torch.where(inside, 2, 1)) and torch.equal(t_r[2:], torch.where(inside, 1, 2))


def _stub_trainer(vae_folder, align_epochs=1, segment_epochs=3, iters=4, **hp):
    """A SemiGDATrainer without nnU-Net's set-up: a tiny model in eval mode (no dropout, fixed batch
    norm: its forwards repeat), the settings, and the phases (epochs) of a short run."""
    from semidiff_nnunet.training import Phase, PhaseSpan

    tr = T.SemiGDATrainer.__new__(T.SemiGDATrainer)
    tr.hp = T.SemiGDAHParams(vae=str(vae_folder), **hp)
    torch.manual_seed(0)  # the same trainable weights in every stub
    tr.model = N.SemiGDANet(V.load_vae(vae_folder), 2).eval()
    tr.num_classes, tr.num_iterations_per_epoch = 2, iters
    tr.num_epochs = align_epochs + segment_epochs
    tr.phase_spans = [PhaseSpan(Phase(T.ALIGN), 0, align_epochs),
                      PhaseSpan(Phase(T.SEGMENT), align_epochs, align_epochs + segment_epochs)]
    tr.current_epoch = tr.iteration = 0
    return tr


def _at(tr, iteration):
    tr.iteration, tr.current_epoch = iteration, iteration // tr.num_iterations_per_epoch
    return tr


def test_lambda_schedule_paper_is_beta_gaussian_over_the_run(vae_folder):
    """§3.4: λ_u(t) = 0.1·exp(−5(1 − t/t_max)²) with t_max the run's iterations, no restart at the
    segment phase; the authors' schedule (default) is 0.3 × a ramp restarting with each phase."""
    import math

    paper = _stub_trainer(vae_folder, align_epochs=1, segment_epochs=3, iters=4, lambda_schedule="paper")
    assert paper.hp.beta == 0.1 and paper.total_iterations == 16
    for t, expect in ((0, 0.1 * math.exp(-5)), (8, 0.1 * math.exp(-1.25)), (16, 0.1)):
        assert _at(paper, t).consistency_weight() == pytest.approx(expect, rel=1e-9)
    assert _at(paper, 4).current_phase.name == T.SEGMENT  # the first segment iteration: no restart
    assert paper.consistency_weight() == pytest.approx(0.1 * math.exp(-5 * 0.75 ** 2), rel=1e-9)
    authors = _stub_trainer(vae_folder, align_epochs=1, segment_epochs=3, iters=4)
    assert authors.hp.lambda_schedule == "authors"
    assert _at(authors, 4).consistency_weight() == pytest.approx(0.3 * math.exp(-5), rel=1e-9)  # restarts
    assert _at(authors, 10).consistency_weight() == pytest.approx(0.3 * math.exp(-5 * 0.5 ** 2), rel=1e-9)


def test_choice_settings_are_checked_before_any_work(vae_folder):
    import typing

    from semidiff_nnunet import api

    hints = typing.get_type_hints(T.SemiGDAHParams)
    for key, bad in (("lambda_schedule", "papr"), ("unsup_seg", "soft")):
        with pytest.raises(SemidiffError) as info:  # the option parser, before check_options and planning
            api.check_train_options("semigda", overrides={"vae": str(vae_folder), key: bad}, configuration="2d")
        msg = str(info.value)
        assert key in msg and all(c in msg for c in typing.get_args(hints[key])) and msg.count(". ") == 0
    T.SemiGDATrainer.check_options(T.SemiGDAHParams(vae=str(vae_folder), lambda_schedule="paper",
                                                    unsup_seg="soft_dice"), "2d", 2)


def test_cross_branch_soft_dice_is_eq_10():
    """Eq. 10 on a hand-computed pair: foreground a = (0.2, 0.8), b = (0.6, 0.4): Σab = 0.44,
    |a| + |b| = 2, Dice loss 1 − 0.44 = 0.56 each way, 1.12 in all; no stop-gradient, so both maps
    get the gradient of 2·(1 − 2Σab/(|a| + |b|)): ∂/∂a_i = −4(b_i(|a| + |b|) − Σab)/(|a| + |b|)²."""
    a = torch.tensor([0.2, 0.8], requires_grad=True)
    b = torch.tensor([0.6, 0.4], requires_grad=True)
    prob_v = torch.stack([1 - a, a]).view(1, 2, 1, 2)
    prob_r = torch.stack([1 - b, b]).view(1, 2, 1, 2)
    loss = T.cross_branch_dice(prob_v, prob_r)
    assert loss.item() == pytest.approx(1.12, abs=1e-5)
    ga, gb = torch.autograd.grad(loss, (a, b))
    assert torch.allclose(ga, torch.tensor([-0.76, -0.36]), atol=1e-5)
    assert torch.allclose(gb, torch.tensor([0.04, -1.16]), atol=1e-5)


def _batches(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    x_l, x_u = torch.randn(n, 1, 16, 16, generator=g), torch.randn(n, 1, 16, 16, generator=g)
    y = torch.zeros(n, 1, 16, 16)
    y[:, :, 4:12, 3:10] = 1
    return {"data": x_l, "target": [y]}, {"data": x_u}


def test_unsup_seg_soft_dice_trains_both_branches_from_each_other(vae_folder):
    """``unsup_seg=soft_dice``: the unlabeled term is w·eq. 10 between the branches' probabilities
    (no pseudo labels, no ``cps``), and its gradient reaches both branches' adapters."""
    labeled, unlabeled = _batches()
    tr = _at(_stub_trainer(vae_folder, unsup_seg="soft_dice", latent_noise_p=0.0, copy_paste_start=1.0), 10)
    terms = tr.compute_losses(labeled, unlabeled)
    assert "cps" not in terms and "_pseudo_foreground" not in terms and "latent_sup" not in terms
    with torch.no_grad():
        out = tr.model.branches(torch.cat([labeled["data"], unlabeled["data"]]))
    w = tr.consistency_weight()
    expect = w * T.cross_branch_dice(out["vae_prob"][2:], out["cnn_prob"][2:])
    assert terms["dice_unsup"].item() == pytest.approx(expect.item(), rel=1e-5)
    for adapters in (tr.model.adapters_vae, tr.model.adapters_cnn):
        grads = torch.autograd.grad(terms["dice_unsup"], list(adapters.parameters()), retain_graph=True)
        assert any(g.abs().sum() > 0 for g in grads)
    default = _at(_stub_trainer(vae_folder, latent_noise_p=0.0, copy_paste_start=1.0), 10)
    assert default.hp.unsup_seg == "cross_pseudo"
    assert {"cps", "_pseudo_foreground"} <= set(default.compute_losses(labeled, unlabeled))


def test_segment_latent_terms_are_eq_5_and_6_in_stage_2(vae_folder):
    """``segment_latent_terms``: stage 2's terms gain latent_sup = eq. 5 on the labeled half and
    latent_unsup = w·MSE(z̃_v^u, z_r^u) (eq. 6 as written, gradient to the mapping model and the
    ResNet); off (default), stage 2 has no latent term."""
    labeled, unlabeled = _batches()
    off = _at(_stub_trainer(vae_folder, latent_noise_p=0.0, copy_paste_start=1.0), 10)
    assert not off.hp.segment_latent_terms
    assert not {"latent_sup", "latent_unsup"} & set(off.compute_losses(labeled, unlabeled))
    assert not {"latent_sup", "latent_unsup"} & set(off.burnin_losses(labeled))
    on = _at(_stub_trainer(vae_folder, latent_noise_p=0.0, copy_paste_start=1.0, segment_latent_terms=True), 10)
    terms = on.compute_losses(labeled, unlabeled)
    with torch.no_grad():
        out = on.model.branches(torch.cat([labeled["data"], unlabeled["data"]]), decode=False)
        z_g = on.model.mask_latent(labeled["target"][0][:, 0].long())
    v, c = out["vae_latent"], out["cnn_latent"]
    eq5 = ((v[:2] - z_g) ** 2).mean() + ((c[:2] - z_g) ** 2).mean()
    eq6 = ((v[2:] - c[2:]) ** 2).mean()
    assert terms["latent_sup"].item() == pytest.approx(eq5.item(), rel=1e-5)
    assert terms["latent_unsup"].item() == pytest.approx(on.consistency_weight() * eq6.item(), rel=1e-5)
    assert terms["dice_sup"].item() == pytest.approx(off.compute_losses(labeled, unlabeled)["dice_sup"].item(),
                                                     rel=1e-6)
    for part in (on.model.mapping, on.model.resnet):
        grads = torch.autograd.grad(terms["latent_unsup"], list(part.parameters()), retain_graph=True,
                                    allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
    burnin = on.burnin_losses(labeled)  # a burn-in iteration of stage 2: L_sup = L_sup^p + L_sup^s
    assert burnin["latent_sup"].item() == pytest.approx(eq5.item(), rel=1e-5) and "dice_sup" in burnin


def test_copy_paste_and_latent_noise_switch_off(vae_folder, monkeypatch):
    """The two additions of the authors' code that the paper lacks can each be switched off:
    ``copy_paste_start=1`` keeps copy-paste off to the last iteration, ``latent_noise_p=0`` never
    samples the latent."""
    on = _stub_trainer(vae_folder)
    assert not _at(on, 7).copy_paste_on() and _at(on, 8).copy_paste_on()  # a third of 12 segment iterations
    off = _stub_trainer(vae_folder, copy_paste_start=1.0, latent_noise_p=0.0)
    assert not any(_at(off, t).copy_paste_on() for t in range(16))
    seen = []
    monkeypatch.setattr(off.model, "branches", lambda x, latent_noise=False, decode=True: seen.append(latent_noise)
                        or N.SemiGDANet.branches(off.model, x, latent_noise, decode))
    labeled, unlabeled = _batches()
    torch.manual_seed(0)
    for _ in range(5):
        off.compute_losses(labeled, unlabeled)
    assert seen == [False] * 5


def test_no_gradient_reaches_the_frozen_vae(vae_folder):
    vae = V.load_vae(vae_folder)
    net = N.SemiGDANet(vae, 3)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, 0.1, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(2, 1, 16, 16), torch.randint(0, 3, (2, 16, 16))
    out = net.branches(x, latent_noise=True)
    z_g = net.mask_latent(y[:1])
    loss = (T.soft_dice_loss(out["vae_prob"], y) + T.soft_dice_loss(out["cnn_prob"], y)
            + T.latent_alignment(out["vae_latent"], out["cnn_latent"], z_g, 1)[0])
    loss.backward()
    assert all(p.grad is None for p in vae.parameters())
    for part in (net.mapping, net.resnet, net.adapters_vae, net.adapters_cnn):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())
    assert len(trainable) + len(list(vae.parameters())) == len(list(net.parameters()))


def test_checkpoint_leaves_out_the_vae(vae_folder):
    net = N.SemiGDANet(V.load_vae(vae_folder), 2)
    state = net.state_dict()
    assert state and not any(k.startswith("vae.") for k in state)
    other = N.SemiGDANet(V.load_vae(vae_folder), 2)
    other.load_state_dict(state)  # strict: the VAE's keys come from its own (frozen) weights
    net.eval(), other.eval()
    x = torch.randn(1, 1, 16, 16)
    assert torch.equal(net(x), other(x))
    with pytest.raises(RuntimeError):
        other.load_state_dict({**state, "mapping.bogus": torch.zeros(1)})


def _managers(patch, vae, schemes=("ZScoreNormalization",)):
    plans = {"semidiff": {"method": "semigda", "hparams": {"vae": str(vae)}}}
    return SimpleNamespace(plans=plans), SimpleNamespace(patch_size=patch, normalization_schemes=list(schemes))


def test_network_from_plans_and_refusals(vae_folder, tmp_path):
    pm, cm = _managers([32, 32], vae_folder, ("RGBTo0_1Normalization",))
    net = T.SemiGDATrainer.build_network_architecture(pm, cm, 3, 2, True)
    assert net.input_mode == "rgb01" and net.num_classes == 2
    net.eval()
    logp = net(torch.rand(1, 3, 32, 32))
    assert logp.shape == (1, 2, 32, 32) and torch.allclose(logp.exp().sum(1), torch.ones(1, 32, 32), atol=1e-4)
    for patch, where, expect in (([16, 32, 32], vae_folder, "-c 2d"), ([31, 32], vae_folder, "divisible"),
                                 ([32, 32], tmp_path / "gone", "does not exist")):
        pm, cm = _managers(patch, where)
        with pytest.raises(SemidiffError, match=expect):
            T.semigda_network(pm, cm, 1, 2)


def test_options_refused_before_planning(vae_folder, tmp_path, monkeypatch):
    """3D, a missing extra or VAE path is answered before any planning: plan_and_train names the fix for a
    dataset that does not even exist (it would otherwise fail on the dataset, or plan for minutes first)."""
    from semidiff_nnunet import api

    monkeypatch.setenv("SEMIDIFF_HOME", str(tmp_path / "home"))
    with pytest.raises(SemidiffError, match="semigda is a 2D method.*-c 2d"):
        api.plan_and_train("Dataset998_Nowhere", "semigda", configuration="3d_fullres",
                           overrides={"vae": str(vae_folder)})
    with pytest.raises(SemidiffError, match="semigda: semigda is a 2D method"):
        api.benchmark("Dataset998_Nowhere", ["supervised", "semigda"], configuration="3d_lowres",
                      overrides={"semigda:vae": str(vae_folder)})
    with pytest.raises(SemidiffError, match="vae=PATH"):
        api.plan_and_train("Dataset998_Nowhere", "semigda", configuration="2d")
    # a relative path is made absolute once, so a resumed run compares like with like
    monkeypatch.chdir(vae_folder.parent)
    opts = api.check_train_options("semigda", overrides={"vae": vae_folder.name}, configuration="2d")
    assert opts.hparams.vae == str(vae_folder)
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("*.json"))


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_semigda_refuses_3d(demo3d, run_cli, vae_folder):
    from conftest import TINY

    code, _, err = run_cli("train", demo3d, "-m", "semigda", "--labeled", "2", "-c", "3d_fullres",
                           "--epochs", "1", "--iters-per-epoch", "1", "--no-val", "--set", f"vae={vae_folder}", *TINY)
    assert code == 1 and "semigda is a 2D method" in err and "-c 2d" in err and "Traceback" not in err


@pytest.mark.slow
def test_semigda_2d_cli_and_stock_prediction(demo2d, run_cli, tmp_path, vae_folder):
    import numpy as np
    from conftest import TINY
    from helpers import assert_stock_predictor_matches, load_image, raw

    from semidiff_nnunet import api

    # a missing VAE path: one sentence
    code, _, err = run_cli("plan-and-train", demo2d, "-m", "semigda", "--labeled", "0.2", "-c", "2d",
                           "--epochs", "3", "--iters-per-epoch", "2", "--no-val",
                           "--set", f"vae={tmp_path / 'nowhere'}", *TINY)
    assert code == 1 and "vae=" in err and "Traceback" not in err

    code, _, err = run_cli("plan-and-train", demo2d, "-m", "semigda", "--labeled", "0.2", "-c", "2d",
                           "--epochs", "3", "--iters-per-epoch", "2", "--no-val", "--set", f"vae={vae_folder}",
                           "--set", "phase.align=1", "--set", "copy_paste_start=0.5", *TINY)
    assert code == 0, err
    info = api.run_info(demo2d, "semigda", "0.2", 0, "2d", 0, "semidiffDemoPlans")
    ck = torch.load(info.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["current_epoch"] == 3 and ck["trainer_name"] == "SemiGDATrainer"
    assert set(ck["semidiff"]["networks"]) == {"network", "mapping"}
    assert not any(k.startswith("vae.") for k in ck["network_weights"])
    log = ck["logging"]
    assert log["phase"] == ["align", "segment", "segment"]
    assert all(np.isfinite(log["term/latent_sup"][:1])) and all(np.isfinite(log["term/dice_sup"][1:]))
    # copy-paste from half of the segmentation phase on (epoch 2), and the ramped weight is positive
    assert log["term/copy_paste"][1] == 0 and log["term/copy_paste"][2] > 0 and log["term/cps"][2] > 0
    # stage 2: one SGD (lr 0.01 poly, momentum 0.9, weight decay 1e-4) on the mapping model and on the rest
    for opt in (ck["optimizer_state"], ck["semidiff"]["optimizers"]["mapping"]):
        group = opt["param_groups"][0]
        assert group["momentum"] == 0.9 and group["weight_decay"] == 1e-4 and "betas" not in group
    net_params = len(ck["optimizer_state"]["param_groups"][0]["params"])
    assert net_params == len([k for k in ck["network_weights"]
                              if not k.startswith("mapping.") and "running_" not in k and "num_batches" not in k])
    run = json.loads((info.fold_folder / "semidiff_run.json").read_text())
    assert run["hparams"]["vae"] == str(vae_folder)

    pred = tmp_path / "pred"
    api.predict(demo2d, "semigda", raw(demo2d) / "imagesTs", pred, labeled="0.2", configuration="2d", device="cpu",
                plans_name="semidiffDemoPlans", use_mirroring=False, show_progress=False)
    files = sorted(p.name for p in pred.glob("*.nii.gz"))
    assert len(files) == 3
    seg = load_image(pred / files[0])
    assert seg.shape == load_image(raw(demo2d) / "labelsTs" / files[0]).shape and set(np.unique(seg)) <= {0, 1, 2}
    assert_stock_predictor_matches(run_cli, demo2d, "semigda", "0.2", pred, tmp_path)


@pytest.mark.slow
def test_semigda_resumes_at_the_stage_boundary(demo2d, monkeypatch, vae_folder):
    """A run interrupted right after the alignment phase, resumed with --continue, ends bit-identical
    to the uninterrupted run (optimisers rebuilt per phase, mapping model's AdamW → SGD)."""
    import shutil

    from semidiff_nnunet import api
    from semidiff_nnunet.plugins.semigda.trainer import SemiGDATrainer

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    kw = dict(labeled="0.4", seed=0, configuration="2d", fold=0, device="cpu", epochs=3, iters_per_epoch=2,
              plans_name="semidiffDemoPlans", val_iters_per_epoch=0, final_validation=False, show_progress=False,
              save_every=1, overrides={"vae": str(vae_folder), "phase.align": "1"})

    def final(info):
        return torch.load(info.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)

    straight = api.train(demo2d, "semigda", **kw)
    reference = final(straight)
    shutil.rmtree(straight.run_root)
    original = SemiGDATrainer.on_epoch_end

    def crash_after_alignment(self):
        original(self)  # checkpoint_latest of epoch 0, the last alignment epoch
        if self.current_epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(SemiGDATrainer, "on_epoch_end", crash_after_alignment)
    with pytest.raises(KeyboardInterrupt):
        api.train(demo2d, "semigda", **kw)
    monkeypatch.setattr(SemiGDATrainer, "on_epoch_end", original)
    monkeypatch.chdir(vae_folder.parent)  # resumed with the same weights given by a relative path
    kw["overrides"] = {**kw["overrides"], "vae": vae_folder.name}
    resumed = final(api.train(demo2d, "semigda", continue_training=True, **kw))
    for key in ("network_weights", "optimizer_state"):
        a, b = reference[key], resumed[key]
        assert a.keys() == b.keys()
    assert all(torch.equal(reference["network_weights"][k], resumed["network_weights"][k])
               for k in reference["network_weights"])
    assert reference["logging"]["train_losses"] == resumed["logging"]["train_losses"]
    assert reference["semidiff"]["iteration"] == resumed["semidiff"]["iteration"] == 6
