"""optimize() in every form, the "mmgen" entry point, explain()."""

from importlib.metadata import entry_points

import torch
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule

import torch_mmgen_opt as mmgen
from torch_mmgen_opt.testing import TestCase, run_tests


class Tiny(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        return torch.relu(self.proj(x))


class TestOptimize(TestCase):
    def test_function_on_instance(self):
        m = Tiny().eval()
        x = torch.randn(2, 8)
        fast = mmgen.optimize(m)
        self.assertIsInstance(fast, OptimizedModule)
        self.assertIs(fast._orig_mod, m)
        self.assertEqual(fast(x), m(x))
        self.assertEqual(mmgen.explain(fast).graphs_compiled, 1)
        self.assertIn("graph(s) compiled", mmgen.explain(fast).to_markdown())

    def test_bare_decorator_on_class_keeps_class(self):
        @mmgen.optimize
        class Decorated(Tiny):
            pass

        fast = Decorated(width=4)
        self.assertIsInstance(fast, OptimizedModule)
        self.assertIs(type(fast._orig_mod), Decorated.__mmgen_wrapped_class__)
        self.assertEqual(fast._mmgen_config, mmgen.OptimizeConfig())
        self.assertEqual(Decorated.__name__, "Decorated")

    def test_decorator_with_arguments(self):
        cfg = mmgen.OptimizeConfig(attention=False)

        @mmgen.optimize(config=cfg, max_seq_len=128)
        class Decorated(Tiny):
            pass

        fast = Decorated()
        self.assertEqual(fast._mmgen_config, cfg.replace(max_seq_len=128))
        inst = mmgen.optimize(attention=False)(Tiny())
        self.assertIsInstance(inst, OptimizedModule)
        self.assertFalse(inst._mmgen_config.attention.fuse)

    def test_function_target(self):
        @mmgen.optimize
        def fn(x):
            return x.sin() + 1

        x = torch.randn(3)
        self.assertEqual(fn(x), x.sin() + 1)

    def test_user_mistakes(self):
        with self.assertRaisesRegex(TypeError, "nn.Module"):
            mmgen.optimize(int)
        with self.assertRaisesRegex(TypeError, "nn.Module"):
            mmgen.optimize(3)
        with self.assertRaisesRegex(TypeError, "OptimizeConfig"):
            mmgen.optimize(Tiny(), config={"quantize": "int8"})
        with self.assertRaisesRegex(ValueError, "unknown mmgen option"):
            mmgen.optimize(Tiny(), quantise="int8")
        with self.assertRaisesRegex(TypeError, "optimize"):
            mmgen.explain(Tiny())

    def test_reports_stay_on_each_wrapper(self):
        # OptimizedModule.__setattr__ forwards to the wrapped module: our attributes must not.
        m = Tiny()
        a, b = mmgen.optimize(m), mmgen.optimize(m, attention=False)
        self.assertIsNot(mmgen.explain(a), mmgen.explain(b))
        self.assertFalse(hasattr(m, "_mmgen_report"))
        self.assertTrue(a._mmgen_config.attention.fuse)
        self.assertFalse(b._mmgen_config.attention.fuse)

    def test_pipeline_protocol(self):
        class Pipeline(nn.Module):
            def __mmgen_optimize__(self, config):
                return ("optimized", config)

        self.assertEqual(mmgen.optimize(Pipeline(), max_batch_size=2)[1].max_batch_size, 2)


class TestBackendEntryPoint(TestCase):
    def test_entry_point_registered(self):
        names = {ep.name for ep in entry_points(group="torch_dynamo_backends")}
        self.assertIn("mmgen", names)
        self.assertIn("mmgen", torch._dynamo.list_backends())

    def test_compile_by_name_with_options(self):
        m = Tiny().eval()
        x = torch.randn(2, 8)
        fast = torch.compile(m, backend="mmgen", options={"attention": False})
        self.assertEqual(fast(x), m(x))
        with self.assertRaisesRegex(Exception, "unknown mmgen option"):
            torch.compile(Tiny(), backend="mmgen", options={"bogus": 1})(x)


class TestInputAsserts(TestCase):
    """Inductor's per-call input asserts are off by default (Dynamo's guards check the
    same), per compile only, and back with ``CompileConfig(input_asserts=True)``."""

    def test_patches_and_generated_code(self):
        import torch._inductor.config as inductor_config
        from torch._inductor.utils import run_and_get_code

        from torch_mmgen_opt.api import inductor_patches

        cpu = torch.device("cpu")
        patches = inductor_patches(mmgen.OptimizeConfig(), cpu)
        self.assertIs(patches["size_asserts"], False)
        on = mmgen.OptimizeConfig(compile=mmgen.CompileConfig(input_asserts=True))
        self.assertNotIn("size_asserts", inductor_patches(on, cpu))
        x = torch.randn(2, 8)
        for config, present in ((mmgen.OptimizeConfig(), False), (on, True)):
            with self.subTest(input_asserts=present):
                torch._dynamo.reset()
                m = Tiny().eval()
                out, (code,) = run_and_get_code(mmgen.optimize(m, config=config), x)
                self.assertEqual(out, m(x))
                self.assertEqual("'input')" in code, present)  # assert_size_stride(x, .., 'input')
        self.assertTrue(inductor_config.size_asserts)  # nothing global was changed


if __name__ == "__main__":
    run_tests()
