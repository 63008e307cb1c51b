"""Writes the golden reference fixtures tests/golden/*.npz with torch.

Run by hand where torch, torchvision and anomalib are installed (never in
CI; the tests read the .npz files without torch):

  /work/torch_venv/bin/python tests/golden/make_goldens.py [NAME ...]

NAMEs (the keys of FIXTURES) write only those files; `--out DIR` first
writes elsewhere (to compare a rerun with the stored files: the arrays
come out equal, the zip files' dates do not).

Fixtures (images are NHWC; torch tensors keep their own layout):
- torchvision_<arch>.npz (resnet18, wide_resnet50_2 through layer3):
  a state dict (seeded conv weights, see `seeded.py`; BatchNorm affine
  values random and running statistics from one calibration batch), two
  32x32 inputs and layer1..layer3 in float64.
- reverse_distillation.npz: anomalib's ReverseDistillationModel on a
  resnet18 teacher at 64x64 ('add' anomaly maps), teacher and student
  states, eval-mode teacher and student maps, the anomaly map and score,
  and the train-mode loss (anomalib's ReverseDistillationLoss).
- reverse_distillation_gradients.npz: at that model and those images,
  the loss's gradients with respect to the bottleneck's and decoder's
  parameters (teacher frozen), in float64: every 1-D tensor's whole, and
  per kernel its norm, sum and [:4, :4] corner (torch layout), as 60 MB
  would not fit.
- ganomaly.npz: the official GANomaly networks (anomalib's modules, with
  the first convolution's padding set back to the official 1) at 32x32x3,
  width 4, code 8, and one official training step (samet-akcay/ganomaly
  lib/model.py `optimize_params`): forward outputs, the three generator
  terms, the discriminator loss, both networks' gradients and the change
  of their parameters after one Adam(2e-4, (0.5, 0.999)) step.
- ganomaly_adam.npz: the same networks after three official steps on
  three new batches (uint8 pixels, fed as p / 127.5 - 1): each step's
  two losses and the parameters' total change, which Adam's moments
  (betas) shape from the second step on.
"""

import os
import sys

import torch._dynamo  # noqa: F401  # Before anything imports TensorFlow.
import numpy as np
import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import seeded  # noqa: E402  # pylint: disable=g-import-not-at-top

OUT = os.path.dirname(os.path.abspath(__file__))


def _numpy_state(module):
  return {k: v.detach().cpu().numpy().copy()
          for k, v in module.state_dict().items()}


def seed_and_calibrate(module, seed, run_train):
  """Seeded conv weights, random BN affine values, and BN running stats
  := the batch statistics of `run_train()` (one train-mode pass)."""
  keys_shapes = [(k, list(v.shape)) for k, v in module.state_dict().items()]
  weights = seeded.seeded_weights(keys_shapes, seed)
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    state = module.state_dict()
    for key, value in weights.items():
      state[key].copy_(torch.from_numpy(value))
    for m in module.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
        m.bias.copy_(0.4 * torch.rand(m.bias.shape, generator=generator)
                     - 0.2)
        m.momentum = None  # Running stats := one batch's statistics.
        m.reset_running_stats()
    run_train()
  return module.eval()


def torchvision_golden(arch, seed):
  model = getattr(torchvision.models, arch)(weights=None)
  model.layer4, model.fc = torch.nn.Identity(), torch.nn.Identity()
  calibration = torch.randn(8, 3, 32, 32, generator=torch.Generator()
                            .manual_seed(seed + 1))

  def features(h):
    h = model.maxpool(model.relu(model.bn1(model.conv1(h))))
    out = {}
    for name in ("layer1", "layer2", "layer3"):
      h = getattr(model, name)(h)
      out[name] = h
    return out

  seed_and_calibrate(model, seed,
                     lambda: (model.train(), features(calibration)))
  arrays = {}
  seeded.pack_state("state", _numpy_state(model), seed, arrays)
  x = np.random.default_rng(seed + 2).standard_normal((2, 32, 32, 3))
  model = model.double()
  with torch.no_grad():
    out = features(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  arrays["images"] = x
  for name, value in out.items():
    arrays[name] = value.permute(0, 2, 3, 1).numpy()
  return arrays


def _reverse_distillation_model(seed):
  """anomalib's RD model on a seeded, calibrated resnet18 teacher (64x64),
  its packed states and the fixture's two input images."""
  from anomalib.models.image.reverse_distillation import torch_model  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = torch_model.ReverseDistillationModel(
      "resnet18", (64, 64), ["layer1", "layer2", "layer3"], "add",
      pre_trained=False)
  calibration = torch.randn(8, 3, 64, 64, generator=torch.Generator()
                            .manual_seed(seed + 1))
  teacher = model.encoder.feature_extractor
  seed_and_calibrate(teacher, seed, lambda: teacher.train()(calibration))
  maps = [m.detach() for m in teacher(calibration)]
  seed_and_calibrate(model.bottleneck, seed + 10,
                     lambda: model.bottleneck.train()(maps))
  code = model.bottleneck(maps).detach()
  seed_and_calibrate(model.decoder, seed + 20,
                     lambda: model.decoder.train()(code))
  arrays = {}
  for name, module in (("teacher", teacher), ("bottleneck", model.bottleneck),
                       ("decoder", model.decoder)):
    seeded.pack_state(name, _numpy_state(module), {
        "teacher": seed, "bottleneck": seed + 10, "decoder": seed + 20}[name],
                      arrays)
  x = np.random.default_rng(seed + 2).standard_normal(
      (2, 64, 64, 3)).astype(np.float32)
  return model, arrays, x


def _train_loss(model, images):
  """anomalib's ReverseDistillationLoss in train mode (teacher in eval)."""
  from anomalib.models.image.reverse_distillation import loss as rd_loss  # pylint: disable=g-import-not-at-top
  model.train()
  encoder_features, decoder_features = model(images)
  return rd_loss.ReverseDistillationLoss()(
      [f.contiguous() for f in encoder_features],
      [f.contiguous() for f in decoder_features])


def reverse_distillation_golden(seed):
  model, arrays, x = _reverse_distillation_model(seed)
  images = torch.from_numpy(x.transpose(0, 3, 1, 2))
  nhwc = lambda t: t.detach().permute(0, 2, 3, 1).numpy()
  with torch.no_grad():
    model.eval()
    teacher_maps = list(model.encoder(images).values())
    student_maps = model.decoder(model.bottleneck(teacher_maps))
    batch = model(images)
  arrays["images"] = x
  for i in range(3):
    arrays[f"teacher_{i}"] = nhwc(teacher_maps[i])
    arrays[f"student_{i}"] = nhwc(student_maps[i])
  arrays["anomaly_map"] = batch.anomaly_map[:, 0].numpy()
  arrays["pred_score"] = batch.pred_score.numpy()
  with torch.no_grad():
    arrays["train_loss"] = np.array(float(_train_loss(model, images)))
  return arrays


def reverse_distillation_gradient_golden(seed, corner=4):
  """d loss / d (bottleneck, decoder) parameters at reverse_distillation's
  model and inputs, the teacher frozen. Whole gradients are 60 MB: kept
  are every 1-D tensor's, and per kernel its norm, its sum and its
  [:corner, :corner] block (torch layout: leading two axes)."""
  model, _, x = _reverse_distillation_model(seed)
  model = model.double()  # float32 noise would hide small errors.
  for p in model.encoder.parameters():
    p.requires_grad_(False)
  loss = _train_loss(model, torch.from_numpy(x.transpose(0, 3, 1, 2))
                     .double())
  loss.backward()
  arrays = {"train_loss": np.array(loss.item())}
  for name, module in (("bottleneck", model.bottleneck),
                       ("decoder", model.decoder)):
    for key, value in module.named_parameters():
      if value.grad is None:  # The official OCBE never uses conv4 / bn4.
        continue
      grad = value.grad.numpy()
      prefix = f"grad/{name}/{key}"
      if grad.ndim == 1:
        arrays[prefix] = grad
        continue
      arrays[prefix + ".norm"] = np.array(np.linalg.norm(grad))
      arrays[prefix + ".sum"] = np.array(grad.sum())
      arrays[prefix + ".corner"] = grad[:corner, :corner]
  return arrays


def _ganomaly_networks(seed, size, channels, width, latent):
  """The official GANomaly networks (anomalib's modules, first padding 1),
  initialised as the official code does, and their Adam optimisers."""
  from anomalib.models.image.ganomaly import torch_model  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  gen = torch_model.Generator((size, size), latent, channels, width)
  disc = torch_model.Discriminator((size, size), channels, width)
  # anomalib pads the first 4x4 stride-2 conv by 4; the official code by 1.
  for first in (gen.encoder1.input_layers[0], gen.encoder2.input_layers[0],
                disc.features[0]):
    assert isinstance(first, torch.nn.Conv2d)
    first.padding = (1, 1)
  for net in (gen, disc):
    net.apply(torch_model.GanomalyModel.weights_init)
  gen.train(), disc.train()
  opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
  opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
  return gen, disc, opt_g, opt_d


def _official_step(gen, disc, opt_g, opt_d, images):
  """One official training step (samet-akcay/ganomaly lib/model.py
  `optimize_params`); returns its forward outputs, losses and gradients."""
  # forward_g, forward_d.
  fake, latent_i, latent_o = gen(images)
  pred_real, feat_real = disc(images)
  pred_fake, feat_fake = disc(fake.detach())
  # update_netg: backward_g (its own D passes), then the step.
  opt_g.zero_grad()
  adversarial = torch.mean((disc(images)[1] - disc(fake)[1])**2)
  contextual = torch.mean(torch.abs(fake - images))
  encoder = torch.mean((latent_o - latent_i)**2)
  err_g = adversarial * 1 + contextual * 50 + encoder * 1
  err_g.backward(retain_graph=True)
  g_grads = {k: v.grad.clone() for k, v in gen.named_parameters()}
  opt_g.step()
  # update_netd: backward_d on forward_d's predictions, then the step.
  opt_d.zero_grad()
  bce = torch.nn.BCELoss()
  err_d = 0.5 * (bce(pred_real, torch.ones_like(pred_real))
                 + bce(pred_fake, torch.zeros_like(pred_fake)))
  err_d.backward()
  d_grads = {k: v.grad.clone() for k, v in disc.named_parameters()}
  opt_d.step()
  # The official code reinitialises D when err_d < 1e-5; never here.
  assert err_d.item() > 1e-5
  nhwc = lambda t: t.detach().permute(0, 2, 3, 1).numpy()
  return dict(
      fake=nhwc(fake), latent_in=latent_i.detach().flatten(1).numpy(),
      latent_out=latent_o.detach().flatten(1).numpy(),
      features_real=nhwc(feat_real), features_fake=nhwc(feat_fake),
      prob_real=pred_real.detach().numpy(),
      prob_fake=pred_fake.detach().numpy(),
      adversarial=adversarial.item(), contextual=contextual.item(),
      encoder=encoder.item(), generator_loss=err_g.item(),
      discriminator_loss=err_d.item()), {"generator": g_grads,
                                        "discriminator": d_grads}


def _parameters(gen, disc):
  return {n: {k: v.detach().clone() for k, v in net.named_parameters()}
          for n, net in (("generator", gen), ("discriminator", disc))}


def ganomaly_golden(seed, size=32, channels=3, width=4, latent=8, batch=4):
  gen, disc, opt_g, opt_d = _ganomaly_networks(seed, size, channels, width,
                                               latent)
  arrays = {}
  for name, net in (("generator", gen), ("discriminator", disc)):
    for key, value in _numpy_state(net).items():
      arrays[f"{name}/{key}"] = value
  x = np.random.default_rng(seed + 1).uniform(
      -1, 1, (batch, size, size, channels)).astype(np.float32)
  before = _parameters(gen, disc)
  outputs, grads = _official_step(gen, disc, opt_g, opt_d,
                                  torch.from_numpy(x.transpose(0, 3, 1, 2)))
  after = _parameters(gen, disc)
  arrays.update(images=x, **outputs)
  for name in ("generator", "discriminator"):
    for key, value in after[name].items():
      arrays[f"grad/{name}/{key}"] = grads[name][key].numpy()
      arrays[f"step/{name}/{key}"] = (value - before[name][key]).numpy()
  # The generator's BN statistics after its one train-mode pass.
  for key, value in gen.state_dict().items():
    if "running" in key:
      arrays[f"after/generator/{key}"] = value.numpy()
  return arrays


def ganomaly_adam_golden(seed, steps=3, size=32, channels=3, width=4,
                         latent=8, batch=4):
  """ganomaly's networks after `steps` official steps, one new batch each
  (a repeated batch gives near-equal gradients, and Adam's steps are then
  about lr * sign(g) whatever its betas). Images are uint8 pixels, fed as
  p / 127.5 - 1; kept: the images, each step's losses and the parameters'
  total change."""
  gen, disc, opt_g, opt_d = _ganomaly_networks(seed, size, channels, width,
                                               latent)
  pixels = np.random.default_rng(seed + 2).integers(
      0, 256, (steps, batch, size, size, channels), np.uint8)
  before = _parameters(gen, disc)
  arrays = {"pixels": pixels}
  for step, x in enumerate(pixels.astype(np.float32) / np.float32(127.5)
                           - np.float32(1)):
    outputs, _ = _official_step(gen, disc, opt_g, opt_d,
                                torch.from_numpy(x.transpose(0, 3, 1, 2)))
    for key in ("generator_loss", "discriminator_loss"):
      arrays[f"{key}_{step}"] = np.array(outputs[key])
  after = _parameters(gen, disc)
  for name in ("generator", "discriminator"):
    for key, value in after[name].items():
      arrays[f"change/{name}/{key}"] = (value - before[name][key]).numpy()
  return arrays


FIXTURES = {
    "torchvision_resnet18": lambda: torchvision_golden("resnet18", 0),
    "torchvision_wide_resnet50_2": lambda: torchvision_golden(
        "wide_resnet50_2", 1),
    "reverse_distillation": lambda: reverse_distillation_golden(2),
    "reverse_distillation_gradients": lambda: (
        reverse_distillation_gradient_golden(2)),
    "ganomaly": lambda: ganomaly_golden(3),
    "ganomaly_adam": lambda: ganomaly_adam_golden(3),
}


def main(argv):
  """make_goldens.py [--out DIR] [NAME ...]: writes the named fixtures
  (all by default) into DIR (default: this folder)."""
  out = OUT
  if argv[:1] == ["--out"]:
    out, argv = argv[1], argv[2:]
  torch.set_num_threads(2)
  for name in argv or FIXTURES:
    np.savez_compressed(os.path.join(out, f"{name}.npz"), **FIXTURES[name]())
    size = os.path.getsize(os.path.join(out, f"{name}.npz"))
    print(f"{name}.npz: {size / 1e3:.0f} kB")


if __name__ == "__main__":
  main(sys.argv[1:])
