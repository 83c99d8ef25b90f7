"""CycleGAN parts (Zhu et al. 2017), as SeUDA, CIRN and TD/TF use them, and the GAN losses.

- `ResnetGenerator`: c7s1-ngf, two stride-2 downsamplings, `blocks` residual blocks (9, or 6 for small images),
  two transposed-convolution upsamplings, c7s1-out with tanh; reflection padding and instance norm (no affine, so
  convolutions keep their bias). 11,378,179 parameters at ngf = 64, 9 blocks, RGB.
  Sizes: the two stride-2 stages and their transposed twins return the input size only for sizes divisible by 4;
  other sizes are REJECTED with a clear error (padding would silently shift the translated image against its label).
- `PatchDiscriminator`: the 70x70 PatchGAN (n_layers 3: 4x4 convolutions with strides 2, 2, 2, 1, 1; instance norm
  after all but the first and the last; LeakyReLU 0.2). 2,764,737 parameters at ndf = 64, RGB.
- Least-squares and vanilla GAN losses, pure functions of discriminator outputs.
- `ImagePool`: the history of the 50 last fakes used for discriminator updates; randomness from a torch.Generator,
  state checkpointable as a list of tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """Images (B, C, H, W) in [-1, 1], H and W divisible by 4 → translated images (B, C_out, H, W) in [-1, 1]."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, ngf: int = 64, blocks: int = 9):
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, ngf, 7),
            nn.InstanceNorm2d(ngf),
            nn.ReLU(True),
        ]
        channels = ngf
        for _ in range(2):
            layers += [
                nn.Conv2d(channels, channels * 2, 3, stride=2, padding=1),
                nn.InstanceNorm2d(channels * 2),
                nn.ReLU(True),
            ]
            channels *= 2
        layers += [ResidualBlock(channels) for _ in range(blocks)]
        for _ in range(2):
            layers += [
                nn.ConvTranspose2d(channels, channels // 2, 3, stride=2, padding=1, output_padding=1),
                nn.InstanceNorm2d(channels // 2),
                nn.ReLU(True),
            ]
            channels //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(channels, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(module.weight, 0.0, 0.02)  # CycleGAN's "normal" initialisation
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        if height % 4 or width % 4:
            raise ValueError(
                f"ResnetGenerator needs image sizes divisible by 4 (got {height}x{width}); resize or crop "
                "the images (e.g. to a multiple of 4) before translating them"
            )
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """70x70 PatchGAN: images (B, C, H, W) → real/fake logits per patch (B, 1, H/8 - 2, W/8 - 2)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        multiplier = 1
        for n in range(1, n_layers + 1):
            previous, multiplier = multiplier, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * previous, ndf * multiplier, 4, stride=stride, padding=1),
                nn.InstanceNorm2d(ndf * multiplier),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * multiplier, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def lsgan_loss(prediction: Tensor, target_is_real: bool) -> Tensor:
    """Least-squares GAN loss (Mao et al.): mean (D(x) − c)², c = 1 for real, 0 for fake."""
    target = 1.0 if target_is_real else 0.0
    return ((prediction - target) ** 2).mean()


def vanilla_gan_loss(logits: Tensor, target_is_real: bool) -> Tensor:
    """The original GAN loss on logits: binary cross-entropy against 1 (real) or 0 (fake)."""
    target = torch.full_like(logits, 1.0 if target_is_real else 0.0)
    return F.binary_cross_entropy_with_logits(logits, target)


class ImagePool:
    """The buffer of previously generated images (Shrivastava et al.; CycleGAN; SeUDA "one image from a collection
    of fifty previously generated images").

    `query(images)`: while the pool holds fewer than `size` images, each new image is stored and returned; once full,
    each new image is, with probability 1/2, swapped with a uniformly chosen stored image (the stored one is
    returned), otherwise returned as is.
    """

    def __init__(self, size: int = 50, images: list[Tensor] | None = None):
        self.size = size
        self.images: list[Tensor] = list(images or [])

    def query(self, images: Tensor, generator: torch.Generator) -> Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand((), generator=generator).item() < 0.5:
                index = int(torch.randint(len(self.images), (), generator=generator))
                out.append(self.images[index].clone())
                self.images[index] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, 0)

    def state(self) -> list[Tensor]:
        return [image.cpu() for image in self.images]


def split_resnet_generator(generator: ResnetGenerator) -> tuple[nn.Sequential, nn.Sequential]:
    """A `ResnetGenerator`'s layers as (encoder, decoder): the encoder ends with the last residual block (its latent
    map is (B, 4·ngf, H/4, W/4)), the decoder is the two upsamplings and the output convolution. Both share the
    generator's modules (no copy): decoder(encoder(x)) equals generator(x) exactly. TD/TF attaches its variational
    bottleneck between the two ("attached on the last convolutional block of TD")."""
    layers = list(generator.model)
    last_block = max(index for index, layer in enumerate(layers) if isinstance(layer, ResidualBlock))
    return nn.Sequential(*layers[: last_block + 1]), nn.Sequential(*layers[last_block + 1 :])


class VariationalBottleneck(nn.Module):
    """A variational information bottleneck on a latent map (Alemi et al. 2017): two 1x1 convolutions give the mean μ
    and the log-variance log σ² of a diagonal Gaussian per latent element, initialised like CycleGAN's layers
    (N(0, 0.02), zero bias).

    `forward(h, noise)`: h (B, C, h, w) → (z, μ, log σ²), each (B, C, h, w); z = μ + σ·noise with `noise` ~ N(0, I)
    given by the caller (the reparameterisation trick; randomness stays explicit), or z = μ when noise is None (the
    deterministic code used at test time)."""

    def __init__(self, channels: int):
        super().__init__()
        self.mean = nn.Conv2d(channels, channels, 1)
        self.log_variance = nn.Conv2d(channels, channels, 1)
        for layer in (self.mean, self.log_variance):
            nn.init.normal_(layer.weight, 0.0, 0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, h: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        mean, log_variance = self.mean(h), self.log_variance(h)
        if noise is None:
            return mean, mean, log_variance
        return mean + torch.exp(0.5 * log_variance) * noise, mean, log_variance
