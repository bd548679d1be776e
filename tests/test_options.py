"""hf_kd.options: the choice options as str Enums, one definition per value set, taken as the member or its string."""

from __future__ import annotations

import ast
import json
from enum import Enum
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_kd import options
from hf_kd.options import (
    AmbiguityScore,
    BuiltinDataset,
    CalibrationObjective,
    DistillDivergence,
    EntropyDropRule,
    KMeansBackend,
    LetKDTeacherResize,
    OtherExitLoss,
    RecalibrationLoss,
    RecipeMethod,
    Reduction,
    SourceCorrection,
    SourceLayerSide,
    StrEnum,
    StudentLayerRule,
    TinyBERTProjection,
    to_enum,
)

OPTION_ENUMS = [
    value for value in vars(options).values() if isinstance(value, type) and issubclass(value, StrEnum)
    and value is not StrEnum
]


class TestToEnum:
    def test_string_and_member_give_the_member(self):
        assert to_enum(Reduction, "sum", "reduction") is Reduction.SUM
        assert to_enum(Reduction, Reduction.SUM, "reduction") is Reduction.SUM

    def test_bad_value_names_it_and_the_accepted_values(self):
        with pytest.raises(ValueError) as error:
            to_enum(Reduction, "avg", "reduction")
        assert str(error.value) == "reduction must be one of ('mean', 'sum', 'none'), got 'avg'"

    def test_a_member_of_another_enum_is_rejected(self):
        # "kl" is both a DistillDivergence and a CalibrationObjective value: the value, not the class, decides.
        assert to_enum(DistillDivergence, CalibrationObjective.KL, "divergence") is DistillDivergence.KL
        with pytest.raises(ValueError, match=r"divergence must be one of \('kl', 'js'\), got <CalibrationObjective"):
            to_enum(DistillDivergence, CalibrationObjective.NLL, "divergence")

    def test_none(self):
        assert to_enum(LetKDTeacherResize, None, "resize", allow_none=True) is None
        with pytest.raises(ValueError, match=r"resize must be one of \('adaptive_avg_pool', 'bilinear'\), got None"):
            to_enum(LetKDTeacherResize, None, "resize")
        with pytest.raises(ValueError, match=r"one of \(None, 'adaptive_avg_pool', 'bilinear'\), got 'nearest'"):
            to_enum(LetKDTeacherResize, "nearest", "resize", allow_none=True)


class TestStrEnum:
    @pytest.mark.parametrize("enum_class", OPTION_ENUMS, ids=lambda e: e.__name__)
    def test_members_read_as_their_strings(self, enum_class):
        assert issubclass(enum_class, str) and enum_class.__doc__
        for member in enum_class:
            assert member == member.value and str(member) == f"{member}" == member.value
            assert hash(member) == hash(member.value) and {member.value: 1}[member] == 1
            assert json.dumps({"k": member}) == json.dumps({"k": member.value})

    def test_value_sets_are_defined_once(self):
        # No two option enums share the same set of values (a second definition of one option).
        value_sets = [frozenset(m.value for m in e) for e in OPTION_ENUMS]
        assert len(set(value_sets)) == len(value_sets)
        assert len(OPTION_ENUMS) >= 20

    def test_options_is_a_leaf(self):
        tree = ast.parse(Path(options.__file__).read_text())
        imported = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
        for node in imported:
            assert not (isinstance(node, ast.ImportFrom) and node.level > 0), ast.unparse(node)
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            assert not any(name.split(".")[0] == "hf_kd" for name in names), ast.unparse(node)


class TestPureFunctionsTakeTheEnums:
    """The pure functions check their option through the same enum as the configs: member and string agree, and a
    bad value gets the `X must be one of (...)` message."""

    def test_losses(self):
        from hf_kd.losses import kd_loss, self_kd_loss

        torch.manual_seed(0)
        student, teacher = torch.randn(4, 3), torch.randn(4, 3)
        labels = torch.tensor([0, 1, 2, 0])
        for member in DistillDivergence:
            for reduction in Reduction:
                torch.testing.assert_close(
                    kd_loss(student, teacher, labels, divergence=member, reduction=reduction),
                    kd_loss(student, teacher, labels, divergence=member.value, reduction=reduction.value),
                )
        with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"):
            kd_loss(student, teacher, labels, reduction="avg")

        exits = [torch.randn(4, 3) for _ in range(3)]
        recalibrate = torch.tensor([True, False, True, False])
        for correction in SourceCorrection:
            for other in OtherExitLoss:
                for recalibration in RecalibrationLoss:
                    by_member = self_kd_loss(
                        exits, labels, 0, source_correction=correction, other_exits=other, recalibrate=recalibrate,
                        recalibration_loss=recalibration,
                    )
                    by_string = self_kd_loss(
                        exits, labels, 0, source_correction=correction.value, other_exits=other.value,
                        recalibrate=recalibrate, recalibration_loss=recalibration.value,
                    )
                    torch.testing.assert_close(by_member[0], by_string[0])
        # The options change the loss (the enums are not ignored).
        replace = self_kd_loss(exits, labels, 0, recalibrate=recalibrate, recalibration_loss=RecalibrationLoss.REPLACE)
        add = self_kd_loss(exits, labels, 0, recalibrate=recalibrate, recalibration_loss="add")
        assert not torch.allclose(replace[0], add[0])

    def test_self_kd(self):
        from hf_kd.self_kd import level_of_ambiguity, select_source_exit

        entropies = [1.05, 1.02, 0.60, 0.55, 0.20]
        assert select_source_exit(entropies, EntropyDropRule.LARGEST, side=SourceLayerSide.BEFORE_DROP) == 1
        assert select_source_exit(entropies, "largest", side="before_drop") == 1
        assert select_source_exit(entropies, EntropyDropRule.FIRST_SIGNIFICANT, 0.5, SourceLayerSide.AFTER_DROP) == 2
        probs = np.full((3, 2, 2), 0.5)
        probs[0, :, 0] = 0.9
        probs[0, :, 1] = 0.1
        labels = np.array([0, 1])
        for score in AmbiguityScore:
            np.testing.assert_array_equal(
                level_of_ambiguity(probs, labels, 1, score), level_of_ambiguity(probs, labels, 1, score.value)
            )
        with pytest.raises(ValueError, match=r"score must be one of \('source', 'lower_mean'\), got 'entropy'"):
            level_of_ambiguity(probs, labels, 1, "entropy")

    def test_tinybert_and_letkd(self):
        from hf_kd.kd_layer_targets import match_positions, resolve_kmeans_backend
        from hf_kd.tinybert import IntermediateProjection

        assert IntermediateProjection(4, 4, TinyBERTProjection.IDENTITY).dense is None
        assert IntermediateProjection(4, 6, "linear").dense is not None
        with pytest.raises(ValueError, match=r"intermediate_projection must be one of \('linear', 'identity'\)"):
            IntermediateProjection(4, 4, "mlp")
        assert resolve_kmeans_backend(KMeansBackend.SKLEARN) is KMeansBackend.SKLEARN
        assert resolve_kmeans_backend("auto") in (KMeansBackend.FAISS, KMeansBackend.SKLEARN)
        teacher = torch.randn(2, 5, 8, 8)
        by_member = match_positions(teacher, (2, 3, 3, 3), resize=LetKDTeacherResize.BILINEAR)
        torch.testing.assert_close(by_member, match_positions(teacher, (2, 3, 3, 3), resize="bilinear"))
        pooled = match_positions(teacher, (2, 3, 3, 3), resize=LetKDTeacherResize.ADAPTIVE_AVG_POOL)
        torch.testing.assert_close(pooled, match_positions(teacher, (2, 3, 3, 3), resize="adaptive_avg_pool"))
        assert not torch.allclose(by_member, pooled)
        with pytest.raises(ValueError, match="resize must be one of"):
            match_positions(teacher, (2, 3, 3, 3), resize="nearest")

    def test_student_rule(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        from hf_kd.student import make_student

        torch.manual_seed(0)
        teacher = LlamaForCausalLM(
            LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                        num_attention_heads=2, num_key_value_heads=2)
        )
        assert make_student(teacher, 2, StudentLayerRule.EVERY_OTHER).config.hf_kd_kept_layers == [1, 3]
        assert make_student(teacher, 2, "every_other").config.hf_kd_kept_layers == [1, 3]
        with pytest.raises(ValueError, match=r"rule must be one of \('every_other', 'block_influence'\), got 'x'"):
            make_student(teacher, 1, rule="x")


class TestConsumersShareTheEnums:
    def test_configs_take_the_options_enums(self):
        from hf_kd.trainer.letkd_config import LetKDConfig
        from hf_kd.trainer.self_kd_config import SelfKDConfig
        from hf_kd.trainer.tinybert_config import TinyBERTConfig

        config = SelfKDConfig(output_dir="unused", report_to="none", source_correction="source_wrong")
        assert config.source_correction is SourceCorrection.SOURCE_WRONG
        assert config.distill_divergence is DistillDivergence.KL
        tinybert = TinyBERTConfig(output_dir="unused", report_to="none", intermediate_projection="identity")
        assert tinybert.intermediate_projection is TinyBERTProjection.IDENTITY
        letkd = LetKDConfig(output_dir="unused", report_to="none", letkd_kmeans_backend="sklearn")
        assert letkd.letkd_kmeans_backend is KMeansBackend.SKLEARN and letkd.letkd_teacher_resize is None

    def test_cli_choices_are_the_enum_values(self):
        from hf_kd.cli import build_parser

        parser = build_parser()
        opts = parser.parse_args(["calibrate", "m", "--dataset", "bbc_news", "--objective", "kl"])
        assert opts.dataset == BuiltinDataset.BBC_NEWS and opts.objective == CalibrationObjective.KL
        with pytest.raises(SystemExit):
            parser.parse_args(["calibrate", "m", "--dataset", "imdb"])
        with pytest.raises(SystemExit):
            parser.parse_args(["calibrate", "m", "--dataset", "bbc_news", "--objective", "ece"])

    def test_recipes(self):
        from hf_kd.data import BUILTIN_DATASETS
        from hf_kd.recipes import DATASETS, DISTILL_METHODS, ScriptArguments

        assert set(BUILTIN_DATASETS) == set(BuiltinDataset) and DATASETS is BUILTIN_DATASETS
        assert set(DISTILL_METHODS) == {RecipeMethod.KD, RecipeMethod.TINYBERT} and "kd" in DISTILL_METHODS
        script = ScriptArguments(method="ls", dataset_name="bbc_news")
        assert script.method is RecipeMethod.LS and script.dataset_name is BuiltinDataset.BBC_NEWS
        with pytest.raises(ValueError, match=r"method must be one of \('erm', 'ls', 'kd', 'tinybert'\), got 'distil'"):
            ScriptArguments(method="distil")


def test_modeling_options_stay_in_modeling():
    # hf_kd/modeling is copied next to saved models (trust_remote_code): its enums must not move here, and no value set
    # of this module may repeat one of theirs.
    from hf_kd.modeling.configuration_multi_exit import ExitHeadType, ExitPooling
    from hf_kd.modeling.exit_laplace import KronPrior, LinkApprox
    from hf_kd.modeling.exit_policies import ExitPolicy

    modeling = [ExitHeadType, ExitPooling, KronPrior, LinkApprox, ExitPolicy]
    assert all(not issubclass(e, StrEnum) and issubclass(e, (str, Enum)) for e in modeling)
    ours = {frozenset(m.value for m in e) for e in OPTION_ENUMS}
    assert not ours & {frozenset(m.value for m in e) for e in modeling}
