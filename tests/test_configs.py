"""Every config builds, with the paper's defaults; bad config arguments fail with a clear error."""

import importlib

import pytest

CONFIGS = [
  'moco_to_mae',
  'mae_to_moco',
  'multi_teacher',
  'finetune',
  'linear_probe',
  'transfer_cifar',
  'dino_pretrain',
  'mokd',
]


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_full_and_runlocal(name):
  module = importlib.import_module(f'configs.{name}')
  assert 'python main.py --config=configs/' in module.__doc__  # the run command is documented
  full, local = module.get_config(), module.get_config('runlocal')
  assert full.data.image_size == 224 and local.data.name == 'digits'
  assert local.batch_size <= 128 and local.num_train_steps <= 600
  # ImageNet views flip and blur with MoCo v3's sigmas; the digits' views are scaled to the digits
  from moma_jax.data import augment

  for v in local.data.views.values():
    assert v.flip is False
    assert v.blur_sigma == pytest.approx(tuple(s * v.size / 224 for s in augment.BLUR_SIGMA))
  for v in full.data.views.values():
    assert v.get('flip', True) and v.get('blur_sigma', augment.BLUR_SIGMA) == augment.BLUR_SIGMA
  if name not in ('dino_pretrain', 'mokd'):  # one size for every view: data.image_size moves all
    for c in (full, local):
      c.data.image_size = 48
      assert {v.size for v in c.data.views.values()} == {48}, name


def test_paper_defaults():
  from configs import finetune, moco_to_mae, multi_teacher, transfer_cifar

  c = moco_to_mae.get_config()
  assert (c.moma.mask_ratio, c.batch_size, c.optim.base_lr, c.optim.weight_decay) == (
    0.9,
    4096,
    1.5e-4,
    0.05,
  )
  assert (c.optim.b1, c.optim.b2, c.num_epochs, c.optim.warmup_epochs) == (0.9, 0.95, 100, 20)
  assert c.teachers.moco.student_view == 'strong'
  m = multi_teacher.get_config('variant=S/16,alpha=0.3,beta=0.7')
  assert m.student.variant == 'S/16' and (m.teachers.mae.weight, m.teachers.moco.weight) == (
    0.3,
    0.7,
  )
  f = finetune.get_config('size=L')
  assert (f.optim.base_lr, f.optim.layer_decay, f.classifier.drop_path, f.num_epochs) == (
    1e-3,
    0.75,
    0.2,
    50,
  )
  t = transfer_cifar.get_config('dataset=cifar100')
  assert t.data.name == 'cifar100' and t.num_train_steps == 20_000


def test_bad_arguments():
  from configs import finetune, multi_teacher, transfer_cifar

  with pytest.raises(ValueError, match="unknown config argument 'varient'"):
    multi_teacher.get_config('varient=S/16')
  with pytest.raises(ValueError, match="recipe='pape'"):
    finetune.get_config('recipe=pape')
  with pytest.raises(ValueError, match="dataset='svhn'"):
    transfer_cifar.get_config('dataset=svhn')


def test_layer_decay_is_refused_where_it_means_nothing():
  """--config.optim.layer_decay=0.75 on a MOMA run ended in AttributeError after JAX started
  (issue 30); now a one-line ConfigError before, and fine-tuning keeps it."""
  from configs import finetune, linear_probe, moco_to_mae
  from moma_jax import validate

  c = moco_to_mae.get_config('runlocal')
  c.optim.layer_decay = 0.75
  with pytest.raises(validate.ConfigError, match=r"^optim.layer_decay=0.75: .*'classification'"):
    validate.validate(c, None)
  c = linear_probe.get_config('runlocal')
  c.optim.update(layer_decay=0.75, name='lars')
  with pytest.raises(validate.ConfigError, match="needs optim.name='adamw', not 'lars'"):
    validate.validate(c, None)
  validate.validate(finetune.get_config(), None)  # layer_decay 0.65, AdamW: accepted


def test_every_objective_is_one_registry_entry_that_resolves():
  """Each shipped config's objective is in the registry, and its builder and check exist (adding
  an objective = a module, a builder, a check and one line in objectives/registry.py)."""
  from moma_jax.objectives import registry

  names = {importlib.import_module(f'configs.{n}').get_config().objective for n in CONFIGS}
  names |= {'mae', 'mocov3', 'dmae', 'rc_mae'}  # the other pre-training configs
  assert names == set(registry.OBJECTIVES)
  for entry in registry.OBJECTIVES.values():
    assert callable(registry._resolve(entry.builder)) and callable(registry._resolve(entry.check))
  with pytest.raises(ValueError, match="unknown objective 'byol'; one of moma, classification"):
    registry.entry('byol')
