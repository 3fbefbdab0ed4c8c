import pytest
import torch
import torch.nn.functional as F

from neighborretr.models.builders import open_clip_model, tiny
from neighborretr.models.similarity import weighted_token_similarity


def _batch(b=3, words=10, frames=4, size=32, vocab=1000):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (b, words), generator=g)
    tmask = torch.ones(b, words, dtype=torch.long)
    tmask[0, 6:] = 0
    video = torch.randn(b, frames, 3, size, size, generator=g)
    vmask = torch.ones(b, frames, dtype=torch.long)
    vmask[min(1, b - 1), 2:] = 0
    return ids, tmask, video, vmask


def test_tiny_shapes_and_similarity():
    torch.manual_seed(0)
    model = tiny(image_size=32, width=64, embed_dim=64)
    ids, tmask, video, vmask = _batch()
    out = model(ids, tmask, video, vmask)
    assert out["text"].shape == (3, 10, 64) and out["video"].shape == (3, 4, 64)
    sim = model.similarity(out["text"], tmask, out["video"], vmask)
    assert sim.shape == (3, 3) and torch.isfinite(sim).all()
    full = model.similarity(out["text"][:2], tmask[:2], out["video"], vmask)
    assert full.shape == (2, 3)


def test_chunked_similarity_matches_full():
    torch.manual_seed(0)
    model = tiny(image_size=32, width=64, embed_dim=64)
    text, video = torch.randn(7, 5, 64), torch.randn(5, 3, 64)
    tmask, vmask = torch.ones(7, 5), torch.ones(5, 3)
    tmask[2, 3:] = 0
    vmask[4, 1:] = 0
    full = model.similarity(text, tmask, video, vmask)
    for chunk in (1, 2, 3, 100):
        torch.testing.assert_close(model.chunked_similarity(text, tmask, video, vmask, chunk_size=chunk), full)


def test_weighted_token_similarity_against_loops():
    g = torch.Generator().manual_seed(1)
    text = F.normalize(torch.randn(2, 3, 4, generator=g), dim=-1)
    video = F.normalize(torch.randn(3, 2, 4, generator=g), dim=-1)
    tmask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    vmask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    wt = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.3, 0.5]])
    wv = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.1, 0.9]])
    got = weighted_token_similarity(text, tmask, wt, video, vmask, wv)
    for i in range(2):
        for j in range(3):
            a = [[float(text[i, w] @ video[j, n]) * tmask[i, w] * vmask[j, n] for n in range(2)] for w in range(3)]
            t2v = sum(wt[i, w] * max(a[w]) for w in range(3))
            v2t = sum(wv[j, n] * max(a[w][n] for w in range(3)) for n in range(2))
            assert got[i, j].item() == pytest.approx(float(t2v + v2t) / 2, abs=1e-6)


def test_padded_frames_do_not_change_valid_outputs():
    torch.manual_seed(0)
    model = tiny(image_size=32, width=64, embed_dim=64).eval()
    ids, tmask, video, vmask = _batch(b=1)
    vmask[0, 3:] = 0
    other = video.clone()
    other[0, 3:] = torch.randn_like(other[0, 3:])  # change only the padded frame
    a = model.encode_video(video, vmask)[0, :3]
    b = model.encode_video(other, vmask)[0, :3]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_text_padding_does_not_change_valid_tokens():
    torch.manual_seed(0)
    model = tiny(image_size=32, width=64, embed_dim=64).eval()
    ids = torch.randint(1, 1000, (1, 8))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    a = model.encode_text(ids, mask)[0, :5]
    ids2 = ids.clone()
    ids2[0, 5:] = 0
    torch.testing.assert_close(a, model.encode_text(ids2, mask)[0, :5])


def test_temporal_transformer_initialised_from_text_tower():
    model = tiny(image_size=32, width=64, embed_dim=64)
    assert model.temporal_initialised_from_text
    torch.testing.assert_close(
        model.temporal.frame_position_embeddings.weight[:32], model.clip.positional_embedding[:32]
    )
    torch.testing.assert_close(
        model.temporal.transformer.resblocks[0].mlp.c_fc.weight, model.clip.transformer.resblocks[0].mlp.c_fc.weight
    )


def test_temporal_ln_eps_reaches_every_temporal_layernorm_and_changes_the_output():
    ids, tmask, video, vmask = _batch()
    models, outputs = {}, {}
    for eps in (1e-5, 1e-12):
        torch.manual_seed(0)
        models[eps] = tiny(image_size=32, width=64, embed_dim=64, temporal_ln_eps=eps).eval()
        with torch.no_grad():
            outputs[eps] = models[eps].encode_video(video, vmask)
    parity = models[1e-12]
    temporal_norms = [m for m in parity.temporal.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(temporal_norms) == 2 * 2  # two per block, two blocks
    assert all(m.eps == 1e-12 for m in temporal_norms)
    clip_norms = [m for m in parity.clip.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert clip_norms and all(m.eps == 1e-5 for m in clip_norms)  # the backbone keeps CLIP's epsilon
    state = models[1e-5].state_dict()
    assert all(torch.equal(v, state[k]) for k, v in parity.state_dict().items())  # same weights...
    assert not torch.equal(outputs[1e-12], outputs[1e-5])  # ...another output
    with pytest.raises(ValueError, match="temporal_ln_eps"):
        tiny(image_size=32, width=64, embed_dim=64, temporal_ln_eps=0.0)


@pytest.mark.parametrize("name,patches", [("ViT-B-32", 7)])
def test_real_vit_b32_random_weights_shapes(name, patches):
    model = open_clip_model(name, pretrained=None, temporal_layers=4).eval()
    assert model.embed_dim == 512 and model.image_size == 224
    assert model.temporal_initialised_from_text  # text width 512 == embed dim
    assert len(model.temporal.transformer.resblocks) == 4
    assert not model.clip.visual.conv1.weight.requires_grad  # patch embedding frozen as in the official code
    ids = torch.randint(1, 49000, (2, 24))
    tmask = torch.ones(2, 24, dtype=torch.long)
    video = torch.randn(1, 2, 3, 224, 224)
    vmask = torch.ones(1, 2, dtype=torch.long)
    with torch.no_grad():
        text = model.encode_text(ids, tmask)
        frames = model.encode_video(video, vmask)
        sim = model.similarity(text, tmask, frames, vmask)
    assert text.shape == (2, 24, 512) and frames.shape == (1, 2, 512) and sim.shape == (2, 1)


def test_missing_pretrained_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        open_clip_model("ViT-B-32", pretrained=str(tmp_path / "ViT-B-32.pt"))


def _tiny_clip():
    from neighborretr.models.backbone import build_tiny_clip

    return build_tiny_clip(
        embed_dim=32, image_size=32, patch_size=8, vision_width=32, text_width=32, heads=2, context_length=16
    )


def test_load_weights_from_a_torchscript_archive_and_a_state_dict(tmp_path):
    """OpenAI distributes ViT-B-32.pt as a TorchScript archive; a traced tiny CLIP has the same form."""
    from neighborretr.models.backbone import load_clip_weights

    torch.manual_seed(0)
    source = _tiny_clip().eval()
    traced = torch.jit.trace(
        source, (torch.randn(1, 3, 32, 32), torch.randint(0, 100, (1, 16))), strict=False, check_trace=False
    )
    torch.jit.save(traced, tmp_path / "ViT-tiny.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "plain.pt")
    for name in ("ViT-tiny.pt", "plain.pt"):
        target = _tiny_clip()
        load_clip_weights(target, tmp_path / name)
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), (name, key)


def test_load_weights_rejects_another_architecture(tmp_path):
    from neighborretr.models.backbone import build_tiny_clip, load_clip_weights

    torch.save(build_tiny_clip().state_dict(), tmp_path / "other.pt")
    with pytest.raises((ValueError, RuntimeError), match="other.pt|size mismatch"):
        load_clip_weights(_tiny_clip(), tmp_path / "other.pt")
