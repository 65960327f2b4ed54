"""``transformer.attend``'s 'einsum' implementation: its written-out backward pass
(``_chunked_attention_bwd``) gives autodiff's gradients of plain masked-softmax attention, for
causal query chunks of every size and for full (non-causal) attention; its forward, the same
output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from farmer_jax.nn.transformer import attend


def plain(q, k, v, scale, causal):
  logits = jnp.einsum("bhtd,bhsd->bhts", q, k) * scale
  if causal:
    t = q.shape[2]
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -jnp.inf)
  return jnp.einsum("bhts,bhsd->bhtd", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("causal,chunk", [(True, 0), (True, 8), (True, 4), (True, 2),
                                          (False, 0), (False, 4)])
def test_einsum_attention_gradients_are_autodiffs(causal, chunk):
  rng = np.random.default_rng(chunk)
  q, k, v, g = (jnp.asarray(rng.normal(size=(2, 3, 16, 8)), jnp.float32) for _ in range(4))
  scale = 8 ** -0.5 / 1.3

  def loss(f):
    return lambda q, k, v: jnp.sum(f(q, k, v) * g)

  ours = lambda q, k, v: attend(q, k, v, scale, causal, chunk, impl="einsum")
  want = lambda q, k, v: plain(q, k, v, scale, causal)
  np.testing.assert_allclose(jax.jit(ours)(q, k, v), want(q, k, v), rtol=1e-5, atol=1e-6)
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
  ref = jax.grad(loss(want), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip("qkv", got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
  if causal:   # the last key feeds the last query only: its gradients come from that query alone
    only_last = jax.grad(lambda k: jnp.sum(ours(q, k, v)[:, :, :-1] * g[:, :, :-1]))(k)
    assert float(jnp.max(jnp.abs(only_last[:, :, -1]))) == 0.0
