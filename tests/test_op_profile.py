"""experiments/op_profile.py's categories, on a hand-written HLO module."""

from experiments import op_profile

FWD = (
  'metadata={op_name="jit(step)/jvp(Net)/stage1/conv1/conv_general_dilated"}'
)
BWD = 'metadata={op_name="jit(step)/transpose(jvp(Net))/stage1/conv1/conv_general_dilated"}'
HLO = f"""HloModule step

%fused_computation.1 (p0: f32[8,32,32,16], p1: f32[8,32,32,16]) -> f32[3,3,16,16] {{
  %p0 = f32[8,32,32,16]{{3,2,1,0}} parameter(0)
  %p1 = f32[8,32,32,16]{{3,2,1,0}} parameter(1)
  ROOT %convolution.3 = f32[3,3,16,16]{{3,2,1,0}} convolution(%p0, %p1), window={{size=32x32 pad=1_1x1_1}}, dim_labels=f01b_i01o->01bf
}}

%fused_computation.2 (p0: f32[8,16]) -> f32[8,16] {{
  %p0 = f32[8,16]{{1,0}} parameter(0)
  ROOT %multiply.1 = f32[8,16]{{1,0}} multiply(%p0, %p0), metadata={{op_name="jit(step)/jvp(Net)/stage1/bn1/mul"}}
}}

ENTRY %main.9 (x: f32[8,32,32,16], w: f32[3,3,16,16]) -> f32[16] {{
  %x = f32[8,32,32,16]{{3,2,1,0}} parameter(0)
  %w = f32[3,3,16,16]{{3,2,1,0}} parameter(1)
  %conv_general_dilated.1 = f32[8,32,32,16]{{3,2,1,0}} convolution(%x, %w), window={{size=3x3 pad=1_1x1_1}}, dim_labels=b01f_01io->b01f, {FWD}
  %convolution.2 = f32[8,32,32,16]{{3,2,1,0}} convolution(%x, %w), window={{size=3x3 pad=1_1x1_1}}, dim_labels=b01f_01io->b01f, {BWD}
  %weight_fusion = f32[3,3,16,16]{{3,2,1,0}} fusion(%x, %x), kind=kLoop, calls=%fused_computation.1
  %bn_fusion = f32[8,16]{{1,0}} fusion(%y), kind=kLoop, calls=%fused_computation.2
  %dot.1 = f32[8,16]{{1,0}} dot(%a, %b), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}, metadata={{op_name="jit(step)/jvp(Net)/head/dense1/dot_general"}}
  %dot.2 = f32[144,16]{{1,0}} dot(%c, %d), lhs_contracting_dims={{0}}, rhs_contracting_dims={{0}}, metadata={{op_name="jit(step)/transpose(jvp(Net))/stage1/conv1/dot_general"}}
  %copy.1 = f32[3,3,16,16]{{3,2,1,0}} copy(%w)
  %add.1 = f32[16]{{0}} add(%m, %n), metadata={{op_name="jit(step)/add"}}
  ROOT %reduce.1 = f32[16]{{0}} reduce(%q, %r), dimensions={{0}}, to_apply=%sum
}}
"""


def test_each_operation_gets_its_category():
  instructions, computations = op_profile.parse_hlo(HLO)
  expected = {
    "conv_general_dilated.1": "conv forward",
    "convolution.2": "conv input grad",
    "weight_fusion": "conv weight grad",
    "bn_fusion": "batchnorm",
    "dot.1": "matmul",
    "dot.2": "conv grad (GEMM path)",
    "copy.1": "copy/transpose",
    "add.1": "optimiser",
    "reduce.1": "other",
    "not_in_the_module": "other",
  }
  for name, want in expected.items():
    assert op_profile.category(name, instructions, computations) == want, name


def test_seconds_are_summed_per_category_and_call():
  seconds = {
    "conv_general_dilated.1": 0.4,
    "convolution.2": 0.2,
    "dot.1": 0.1,
    "x": 0.02,
  }
  assert op_profile.by_category(seconds, HLO, calls=2) == {
    "conv forward": 0.2,
    "conv input grad": 0.1,
    "matmul": 0.05,
    "other": 0.01,
  }
