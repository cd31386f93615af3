"""CLIP's modified ResNet (Radford et al. 2021, section 2.4).

Three changes from torchvision's ResNet: a stem of three 3x3 convolutions with an average pool
instead of one 7x7 and a max pool; anti-aliased strided blocks (an average pool before the strided
path and in the shortcut, convolutions at stride 1); and attention pooling over the final feature
map, queried by its mean, in place of global average pooling. BatchNorm keeps running statistics in
the `batch_stats` collection, used when `train=False`.

`init_scheme` chooses how the weights start. Both schemes give the attention pool's projections
normal weights of std C^-0.5 (C = width * 32, the pooled features) and start each bottleneck's last
BatchNorm scale at zero, as OpenAI's `initialize_parameters` does. They differ where OpenAI kept
PyTorch's defaults: "default" draws the convolutions as torchvision's ResNet does (He normal over
fan-out) and zeroes the attention pool's biases; "openai" keeps PyTorch's nn.Conv2d and nn.Linear
defaults there, U(+-1/sqrt(fan_in)) for the convolution kernels and the pool's biases.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.layers import (
    REMAT_POLICIES,
    DenseGeneral,
    DenseInit,
    Dtype,
    check_init_scheme,
    partitioned,
    symmetric_uniform,
)

BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # PyTorch's momentum 0.1, in Flax's convention


def _pool(x: jax.Array, stride: int) -> jax.Array:
    return nn.avg_pool(x, (stride, stride), strides=(stride, stride)) if stride > 1 else x


class ConvBN(nn.Module):
    """Bias-free convolution, BatchNorm, optional ReLU."""

    features: int
    kernel: int = 1
    stride: int = 1
    relu: bool = True
    zero_scale: bool = (
        False  # last BN of a bottleneck starts at zero: each block starts as identity
    )
    init_scheme: str = "default"  # one of layers.INIT_SCHEMES
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pad = self.kernel // 2
        if self.init_scheme == "openai":  # nn.Conv2d's kaiming_uniform(a=sqrt(5))
            kernel_init = symmetric_uniform((self.kernel**2 * x.shape[-1]) ** -0.5)
        else:
            kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
        x = nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(kernel_init, (None, None, "conv_in", "conv_out")),
            name="conv",
        )(x)
        scale_init = nn.initializers.zeros if self.zero_scale else nn.initializers.ones
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPS,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scale_init=partitioned(scale_init, ("norm",)),
            bias_init=partitioned(nn.initializers.zeros, ("norm",)),
            name="bn",
        )(x)
        return nn.relu(x) if self.relu else x


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> avg-pool(stride) -> 1x1 (x4 channels), with an anti-aliased shortcut."""

    planes: int
    stride: int = 1
    init_scheme: str = "default"  # one of layers.INIT_SCHEMES
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(init_scheme=self.init_scheme, dtype=self.dtype, param_dtype=self.param_dtype)
        out = ConvBN(self.planes, 1, name="conv1", **kw)(x, train)
        out = ConvBN(self.planes, 3, name="conv2", **kw)(out, train)
        out = _pool(out, self.stride)
        out = ConvBN(self.planes * 4, 1, relu=False, zero_scale=True, name="conv3", **kw)(
            out, train
        )
        if self.stride > 1 or x.shape[-1] != self.planes * 4:
            x = ConvBN(self.planes * 4, 1, relu=False, name="downsample", **kw)(
                _pool(x, self.stride), train
            )
        return nn.relu(out + x)


class AttentionPool2d(nn.Module):
    """Multi-head attention of the feature map's mean (plus positions) over all positions."""

    heads: int
    output_dim: int
    init_scheme: str = "default"  # one of layers.INIT_SCHEMES
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, project: bool = True) -> jax.Array:
        """[B, H, W, C] -> [B, output_dim]; with `project=False` the pooled attention output
        before its output projection c_proj, [B, C]."""
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)  # [B, HW+1, C]
        pos = self.param(
            "positional_embedding",
            partitioned(nn.initializers.normal(c**-0.5), ("pos", "embed")),
            (h * w + 1, c),
            self.param_dtype,
        )
        x = x + pos.astype(x.dtype)
        head_dim = c // self.heads
        # Every projection reads the C pooled features: fan_in C for the weights and biases.
        if self.init_scheme == "openai":  # nn.Linear's default bias
            bias_init = symmetric_uniform(c**-0.5)
        else:
            bias_init = nn.initializers.zeros
        init = DenseInit(nn.initializers.normal(c**-0.5), bias_init)

        def proj(name: str) -> DenseGeneral:
            return DenseGeneral(
                (self.heads, head_dim),
                kernel_axes=("embed", "heads", "kv"),
                bias_axes=("heads", "kv"),
                init=init,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )

        q = proj("q_proj")(x[:, :1])  # [B, 1, H, K]
        out = jax.nn.dot_product_attention(q, proj("k_proj")(x), proj("v_proj")(x))
        if not project:
            return out[:, 0].reshape(b, c)
        out = DenseGeneral(
            (self.output_dim,),
            kernel_axes=("heads", "kv", "joint"),
            bias_axes=("joint",),
            init=init,
            in_axes=2,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="c_proj",
        )(out)
        return out[:, 0]


class ModifiedResNet(nn.Module):
    """The CLIP ResNet image tower; `layers` gives the bottleneck count of each of the 4 stages."""

    layers: tuple[int, int, int, int]
    width: int
    heads: int
    output_dim: int
    image_size: int = 224
    init_scheme: str = "default"  # one of layers.INIT_SCHEMES; see the module docstring
    remat_policy: str = "none"  # rematerialise each bottleneck: layers.REMAT_POLICIES
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, project: bool = True) -> jax.Array:
        if images.shape[1] != self.image_size or images.shape[2] != self.image_size:
            raise ValueError(
                f"images are {images.shape[1]}x{images.shape[2]}, this model takes "
                f"{self.image_size}x{self.image_size}"
            )
        check_init_scheme(self.init_scheme)
        kw = dict(init_scheme=self.init_scheme, dtype=self.dtype, param_dtype=self.param_dtype)
        x = images.astype(self.dtype)
        x = ConvBN(self.width // 2, 3, stride=2, name="stem1", **kw)(x, train)
        x = ConvBN(self.width // 2, 3, name="stem2", **kw)(x, train)
        x = ConvBN(self.width, 3, name="stem3", **kw)(x, train)
        x = _pool(x, 2)
        block = Bottleneck
        if self.remat_policy != "none":  # `train` (argument 2, after self and x) stays Python
            policy = REMAT_POLICIES[self.remat_policy]
            block = nn.remat(Bottleneck, policy=policy, prevent_cse=True, static_argnums=(2,))
        for stage, blocks in enumerate(self.layers):
            planes = self.width * 2**stage
            for i in range(blocks):
                stride = 2 if (i == 0 and stage > 0) else 1
                x = block(planes, stride, name=f"layer{stage + 1}_{i}", **kw)(x, train)
        return AttentionPool2d(self.heads, self.output_dim, name="attnpool", **kw)(x, project)
