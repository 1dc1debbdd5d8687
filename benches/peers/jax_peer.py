"""JAX / XLA CPU peer: models/mnist.cnn and models/mnist_bn.cnn written with jax.lax, the whole
training step (forward, backward, batchnorm statistics, Adam) one jit-compiled function, Adam
written out (no optax), categorical cross-entropy.

    python jax_peer.py --model mnist_bn --threads 2

XLA's CPU client has no setting for its number of threads: with --threads N below the CPU count
this process is pinned to N CPUs (as taskset would), and Eigen's own pool is turned off.
"""

import os

import common


def init(jax, jnp, bn, key):
    """Parameters (HWIO kernels, Keras's Glorot-uniform init) and batchnorm moving statistics."""
    k = jax.random.split(key, 3)

    def glorot(key, shape, fan_in, fan_out):
        limit = (6.0 / (fan_in + fan_out)) ** 0.5
        return jax.random.uniform(key, shape, jnp.float32, -limit, limit)

    params, stats = {}, {}
    for i, (cin, cout) in enumerate(((1, 32), (32, 64))):
        params[f"conv{i}"] = glorot(k[i], (3, 3, cin, cout), 9 * cin, 9 * cout)
        if bn:
            params[f"gamma{i}"], params[f"beta{i}"] = jnp.ones(cout), jnp.zeros(cout)
            stats[f"mean{i}"], stats[f"var{i}"] = jnp.zeros(cout), jnp.ones(cout)
        else:
            params[f"bias{i}"] = jnp.zeros(cout)
    params["dense"] = glorot(k[2], (1600, common.CLASSES), 1600, common.CLASSES)
    params["dense_bias"] = jnp.zeros(common.CLASSES)
    return params, stats


def forward(jax, jnp, params, stats, x, bn, key=None):
    """Logits and, when training (key given), the updated batchnorm statistics."""
    lax, training, new_stats = jax.lax, key is not None, {}
    for i in range(2):
        x = lax.conv_general_dilated(x, params[f"conv{i}"], (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if bn:
            if training:
                mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
                n = x.size // x.shape[-1]  # Keras updates the moving variance with the unbiased one
                new_stats[f"mean{i}"] = 0.99 * stats[f"mean{i}"] + 0.01 * mean
                new_stats[f"var{i}"] = 0.99 * stats[f"var{i}"] + 0.01 * var * n / (n - 1)
            else:
                mean, var = stats[f"mean{i}"], stats[f"var{i}"]
            x = (x - mean) * (params[f"gamma{i}"] * lax.rsqrt(var + 1e-3)) + params[f"beta{i}"]
        else:
            x = x + params[f"bias{i}"]
        x = jax.nn.relu(x)
        x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    x = x.reshape(x.shape[0], -1)
    if training:
        keep = jax.random.bernoulli(key, 0.5, x.shape)
        x = jnp.where(keep, x / 0.5, 0.0)
    return x @ params["dense"] + params["dense_bias"], new_stats


def main():
    args = common.parse_args(__doc__)
    common.pin_cpus(args.threads)
    flags = "--xla_cpu_multi_thread_eigen=false" if args.threads == 1 else ""
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp

    bn = args.model == "mnist_bn"
    lr, b1, b2, eps = 1e-3, 0.9, 0.999, 1e-7

    def loss_fn(params, stats, x, y, key):
        logits, new_stats = forward(jax, jnp, params, stats, x, bn, key)
        return -(y * jax.nn.log_softmax(logits)).sum(-1).mean(), new_stats

    def train_step(state, x, y):
        params, stats, m, v, t, key = state
        key, sub = jax.random.split(key)
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y, sub)
        t = t + 1
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
        v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
        step = lr * jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)  # Keras's (and Kingma & Ba's) form
        params = jax.tree.map(lambda p, m, v: p - step * m / (jnp.sqrt(v) + eps), params, m, v)
        return (params, stats, m, v, t, key), loss

    train_jit = jax.jit(train_step, donate_argnums=0)
    infer_jit = jax.jit(lambda params, stats, x: jax.nn.softmax(
        forward(jax, jnp, params, stats, x, bn)[0]))

    params, stats = init(jax, jnp, bn, jax.random.PRNGKey(42))
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = [(params, stats, zeros, jax.tree.map(jnp.zeros_like, params), jnp.float32(0),
              jax.random.PRNGKey(0))]
    batches, infer = common.mnist_batches(args)
    batches = [(jax.device_put(x), jax.device_put(y)) for x, y in batches]
    infer = jax.device_put(infer)

    def step(i):
        state[0], loss = train_jit(state[0], *batches[i])
        return loss.block_until_ready()

    def infer_step(_):
        return infer_jit(state[0][0], state[0][1], infer).block_until_ready()

    common.bench(args, f"JAX {jax.__version__} / XLA CPU", step, infer_step, len(batches))


if __name__ == "__main__":
    main()
