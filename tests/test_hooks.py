"""The hook-point table drives every check: names, layers, token modes, steering, registration."""

from __future__ import annotations

import pytest

from vlmsae_utils import encoders, hooks


@pytest.fixture
def extra_hook():
    """A registered per-block hook (the MLP's output inside each block), removed afterwards."""
    spec = hooks.register_hook(
        hooks.HookSpec(
            "mlp_output", per_block=True, layout=hooks.TOKENS, locate=hooks.block_child("mlp"), steerable=True
        )
    )
    try:
        yield spec
    finally:
        hooks.unregister_hook(spec.name)


def test_hook_names_come_from_the_table():
    assert hooks.HOOKS == ("post_mlp_residual", "post_projection") == tuple(s.name for s in hooks.specs())
    assert encoders.HOOKS == hooks.HOOKS
    assert hooks.block_hooks() == ("post_mlp_residual",) and hooks.steerable_hooks() == ("post_mlp_residual",)
    assert hooks.DEFAULT_HOOK in hooks.HOOKS and hooks.EMBEDDING_HOOK in hooks.HOOKS


def test_unknown_hook_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown hook 'pre_mlp'; valid hooks: post_mlp_residual, post_projection"):
        hooks.hook_spec("pre_mlp")


def test_layer_requirements_follow_the_spec():
    assert hooks.check_layer("post_mlp_residual", -2).per_block
    with pytest.raises(ValueError, match="'post_mlp_residual' needs a layer"):
        hooks.check_layer("post_mlp_residual", None)
    assert not hooks.check_layer("post_projection", None).per_block
    with pytest.raises(ValueError, match=r"'post_projection' is global.*layer=None, got 3; per-block hooks: post_mlp"):
        hooks.check_layer("post_projection", 3)


def test_token_modes_follow_the_layout():
    assert hooks.hook_spec("post_mlp_residual").token_modes == hooks.TOKEN_MODES
    assert hooks.hook_spec("post_projection").token_modes == ("cls", "mean", "all")
    with pytest.raises(ValueError, match="post_projection has one vector per image"):
        hooks.check_token_mode("post_projection", "random_k")


def test_steering_only_at_steerable_hooks():
    assert hooks.check_steerable("post_mlp_residual").steerable
    with pytest.raises(ValueError, match=r"cannot clamp at hook 'post_projection'.*valid steering hooks: post_mlp"):
        hooks.check_steerable("post_projection")


def test_a_spec_must_be_consistent():
    with pytest.raises(ValueError, match="layout must be one of tokens, pooled"):
        hooks.HookSpec("x", per_block=True, layout="grid", locate=hooks.block_output)
    with pytest.raises(ValueError, match="only per-block hooks with a token layout can be steerable"):
        hooks.HookSpec("x", per_block=False, layout=hooks.POOLED, locate=hooks.projection_output, steerable=True)


def test_register_and_unregister_restore_the_table(extra_hook):
    assert hooks.HOOKS == ("post_mlp_residual", "post_projection", "mlp_output")
    assert encoders.HOOKS == hooks.HOOKS and hooks.steerable_hooks() == ("post_mlp_residual", "mlp_output")
    with pytest.raises(ValueError, match="already registered"):
        hooks.register_hook(extra_hook)
    assert hooks.register_hook(extra_hook, replace=True) is extra_hook
    with pytest.raises(ValueError, match="built in"):
        hooks.register_hook(hooks.HookSpec("post_projection", False, hooks.POOLED, hooks.projection_output))
    with pytest.raises(ValueError, match="built in"):
        hooks.unregister_hook("post_mlp_residual")


def test_unregistering_gives_back_the_built_in_table():
    hooks.register_hook(hooks.HookSpec("tmp", per_block=True, layout=hooks.TOKENS, locate=hooks.block_output))
    hooks.unregister_hook("tmp")
    assert hooks.HOOKS == ("post_mlp_residual", "post_projection")
    with pytest.raises(ValueError, match="unknown hook 'tmp'"):
        hooks.unregister_hook("tmp")
