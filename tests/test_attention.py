"""Attention capture must not change what the network computes."""
import timm
import torch

from mimiq_deploy.attention import attention_modules
from mimiq_deploy.families import capture_attention
from mimiq_deploy.families.vit import ExplicitAttention
from mimiq_deploy.models import load_model


def _compare(reference, captured, x):
    with torch.no_grad():
        ref, got = reference(x), captured(x)
    assert (ref - got).abs().max().item() <= 1e-5


def test_capture_matches_timm_on_deit_tiny():
    torch.manual_seed(0)
    reference = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    captured = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    captured.load_state_dict(reference.state_dict())
    capture_attention(captured)
    assert len(attention_modules(captured)) == 12
    assert captured.state_dict().keys() == reference.state_dict().keys()
    _compare(reference, captured, torch.randn(2, 3, 224, 224))


def test_capture_matches_timm_on_default():
    reference = load_model("fmnist-vit", capture=False)
    captured = load_model("fmnist-vit")
    assert all(isinstance(m, ExplicitAttention) for m in attention_modules(captured))
    _compare(reference, captured, torch.randn(8, 1, 28, 28))


def test_hooks_see_per_head_tensors():
    model = load_model("fmnist-vit")
    seen = {}
    attn = attention_modules(model)[0]
    attn.qk.register_forward_hook(lambda m, i, o: seen.update(qk=o.shape) and None)
    attn.av.register_forward_hook(lambda m, i, o: seen.update(av=o.shape) and None)
    with torch.no_grad():
        model(torch.randn(3, 1, 28, 28))
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    assert seen["qk"] == (3, attn.num_heads, tokens, tokens)
    assert seen["av"] == (3, attn.num_heads, tokens, attn.head_dim)
