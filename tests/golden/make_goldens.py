"""Writes the golden reference fixtures tests/golden/*.npz with torch.

Run by hand where torch, torchvision and anomalib are installed (never in
CI; the tests read the .npz files without torch):

  /work/torch_venv/bin/python tests/golden/make_goldens.py

Fixtures (images are NHWC; torch tensors keep their own layout):
- torchvision_<arch>.npz (resnet18, wide_resnet50_2 through layer3):
  a state dict (seeded conv weights, see `seeded.py`; BatchNorm affine
  values random and running statistics from one calibration batch), two
  32x32 inputs and layer1..layer3 in float64.
- reverse_distillation.npz: anomalib's ReverseDistillationModel on a
  resnet18 teacher at 64x64 ('add' anomaly maps), teacher and student
  states, eval-mode teacher and student maps, the anomaly map and score,
  and the train-mode loss (anomalib's ReverseDistillationLoss).
- ganomaly.npz: the official GANomaly networks (anomalib's modules, with
  the first convolution's padding set back to the official 1) at 32x32x3,
  width 4, code 8, and one official training step (samet-akcay/ganomaly
  lib/model.py `optimize_params`): forward outputs, the three generator
  terms, the discriminator loss, both networks' gradients and the change
  of their parameters after one Adam(2e-4, (0.5, 0.999)) step.
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
  np.savez_compressed(os.path.join(OUT, f"torchvision_{arch}.npz"), **arrays)


def reverse_distillation_golden(seed):
  from anomalib.models.image.reverse_distillation import (  # pylint: disable=g-import-not-at-top
      loss as rd_loss, torch_model)
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
  model.train()
  with torch.no_grad():
    encoder_features, decoder_features = model(images)
    arrays["train_loss"] = np.array(float(rd_loss.ReverseDistillationLoss()(
        [f.contiguous() for f in encoder_features],
        [f.contiguous() for f in decoder_features])))
  np.savez_compressed(os.path.join(OUT, "reverse_distillation.npz"), **arrays)


def ganomaly_golden(seed, size=32, channels=3, width=4, latent=8, batch=4):
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
  arrays = {}
  for name, net in (("generator", gen), ("discriminator", disc)):
    for key, value in _numpy_state(net).items():
      arrays[f"{name}/{key}"] = value
  x = np.random.default_rng(seed + 1).uniform(
      -1, 1, (batch, size, size, channels)).astype(np.float32)
  images = torch.from_numpy(x.transpose(0, 3, 1, 2))
  gen.train(), disc.train()
  opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
  opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
  before = {n: {k: v.clone() for k, v in net.named_parameters()}
            for n, net in (("generator", gen), ("discriminator", disc))}
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
  nhwc = lambda t: t.detach().permute(0, 2, 3, 1).numpy()
  arrays.update(
      images=x, fake=nhwc(fake), latent_in=latent_i.detach().flatten(1).numpy(),
      latent_out=latent_o.detach().flatten(1).numpy(),
      features_real=nhwc(feat_real), features_fake=nhwc(feat_fake),
      prob_real=pred_real.detach().numpy(),
      prob_fake=pred_fake.detach().numpy(),
      adversarial=adversarial.item(), contextual=contextual.item(),
      encoder=encoder.item(), generator_loss=err_g.item(),
      discriminator_loss=err_d.item())
  for name, net, grads in (("generator", gen, g_grads),
                           ("discriminator", disc, d_grads)):
    for key, value in net.named_parameters():
      arrays[f"grad/{name}/{key}"] = grads[key].numpy()
      arrays[f"step/{name}/{key}"] = (value - before[name][key]).detach(
          ).numpy()
  # The generator's BN statistics after its one train-mode pass.
  for key, value in gen.state_dict().items():
    if "running" in key:
      arrays[f"after/generator/{key}"] = value.numpy()
  np.savez_compressed(os.path.join(OUT, "ganomaly.npz"), **arrays)


def main():
  torch.set_num_threads(2)
  torchvision_golden("resnet18", 0)
  torchvision_golden("wide_resnet50_2", 1)
  reverse_distillation_golden(2)
  ganomaly_golden(3)
  for name in sorted(os.listdir(OUT)):
    if name.endswith(".npz"):
      print(f"{name}: {os.path.getsize(os.path.join(OUT, name)) / 1e3:.0f} kB")


if __name__ == "__main__":
  main()
