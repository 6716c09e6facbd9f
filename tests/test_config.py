"""The params.yaml schema: the shipped file validates, and every bad value stops with a message naming it."""

import copy
import re
from pathlib import Path

import pytest
import yaml

from cfg.maths.samplers import SAMPLERS
from cfg.study.config import Params, ParamsError, describe_schema, load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[1]


def _raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_shipped_params_validate():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.name == "digits"
    assert params.train.p_uncond == [0.1, 0.2, 0.5]
    assert -1.0 in params.sample.w and 0.0 in params.sample.w and max(params.sample.w) == 4.0


def test_fashion_preset_only_lists_differences_and_validates():
    preset = yaml.safe_load((ROOT / "presets" / "fashion_mnist_gpu.yaml").read_text())
    defaults = _raw()
    for section, values in preset.items():
        for key, value in values.items():
            assert defaults[section][key] != value, f"{section}.{key} repeats the default"
    merged = {s: {**defaults.get(s, {}), **preset.get(s, {})} for s in set(defaults) | set(preset)}
    params = params_from_dict(merged)
    assert params.data.name == "fashion_mnist" and params.sample.n_samples >= 10_000


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        (
            "train",
            "p_uncond",
            [0.1, 1.5],
            r"train\.p_uncond\[1\] = 1\.5 is out of range: allowed value >= 0 and value <= 1",
        ),
        ("train", "p_uncond", [], r"train\.p_uncond is an empty list"),
        ("sample", "w", [], r"sample\.w is an empty list"),
        ("sample", "w", [-2.0, 0.0], r"sample\.w\[0\] = -2\.0 is out of range"),
        (
            "sample",
            "sampler",
            "euler",
            rf"sample\.sampler = 'euler' is not allowed; choose one of {re.escape(str(list(SAMPLERS)))}",
        ),
        ("data", "name", "imagenet", r"data\.name = 'imagenet' is not allowed"),
        ("sample", "steps", 0, r"sample\.steps = 0 is out of range: allowed value >= 2"),
        ("train", "steps", -5, r"train\.steps = -5 is out of range: allowed value >= 1"),
        ("train", "lr", "fast", r"train\.lr = 'fast' must be a number"),
        ("train", "steps", 1.5, r"train\.steps = 1\.5 must be an integer"),
        ("train", "bf16", "yes", r"train\.bf16 = 'yes' must be true or false"),
        ("train", "ema_decay", 1.0, r"train\.ema_decay = 1\.0 is out of range"),
    ],
)
def test_bad_values_name_key_value_and_range(section, key, value, message):
    raw = _raw()
    raw[section][key] = value
    with pytest.raises(ParamsError, match=message):
        params_from_dict(raw)


def test_unknown_keys_are_rejected():
    raw = _raw()
    raw["train"]["learning_rate"] = 0.1
    with pytest.raises(ParamsError, match=r"unknown key train\.learning_rate; allowed keys of train: \["):
        params_from_dict(raw)
    raw = _raw()
    raw["trian"] = {}
    with pytest.raises(ParamsError, match="unknown key trian"):
        params_from_dict(raw)


def test_lambda_range_and_missing_file(tmp_path):
    raw = _raw()
    raw["train"]["lambda_min"] = 5.0
    raw["train"]["lambda_max"] = 1.0
    with pytest.raises(ParamsError, match="lambda_min = 5.0 must be below train.lambda_max = 1.0"):
        params_from_dict(raw)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_file_name_is_part_of_the_message(tmp_path):
    raw = _raw()
    raw["train"]["p_uncond"] = [2]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"^params\.yaml: train\.p_uncond\[0\] = 2"):
        load_params(tmp_path / "params.yaml")


def test_section_hash_tracks_only_named_sections():
    a = params_from_dict(_raw())
    raw = _raw()
    raw["sample"]["w"] = [0.0, 1.0]
    b = params_from_dict(raw)
    assert a.section_hash("train") == b.section_hash("train")
    assert a.section_hash("sample") != b.section_hash("sample")


def test_schema_table_covers_every_key():
    keys = {row[0] for row in describe_schema()}
    raw = _raw()
    for section, values in raw.items():
        if isinstance(values, dict) and section != "search":
            for key in values:
                assert f"{section}.{key}" in keys


def test_train_kwargs_hand_every_train_setting_to_train_diffusion():
    # a train.* key added to the schema but not passed on would be validated, hashed and silently ignored
    import dataclasses
    import inspect

    from cfg.engine.training import train_diffusion, train_kwargs

    t = load_params(ROOT / "params.yaml").train
    kwargs = train_kwargs(t)
    assert set(kwargs) <= set(inspect.signature(train_diffusion).parameters)
    fields = {f.name for f in dataclasses.fields(t)}
    # set by the stage (this model's p_uncond, the device, cadences) or read by the stage only (FIDs in training)
    by_stage = {"p_uncond", "device", "devices", "log_every", "checkpoint_every"}
    assert set(kwargs) == fields - by_stage - {"eval_every", "eval_samples", "eval_w"}
    assert kwargs["steps"] == t.steps and kwargs["lr"] == t.lr


def test_sampling_kwargs_hand_the_sample_settings_to_generate_w_grid():
    import inspect

    from cfg.engine.generate import generate_w_grid, sampling_kwargs

    p = load_params(ROOT / "params.yaml")
    kwargs = sampling_kwargs(p)
    assert set(kwargs) <= set(inspect.signature(generate_w_grid).parameters)
    assert (kwargs["steps"], kwargs["seed"], kwargs["batch_size"]) == (p.sample.steps, p.sample.seed, 400)
    assert kwargs["lambda_min"] == p.train.lambda_min and kwargs["bf16"] == p.train.bf16
    assert kwargs["sampler_options"] == {"clip_denoised": 1.0, "v": 0.3}


def test_registry_options_and_devices_are_checked_before_any_work():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    cases = [
        (
            ("sample", "sampler_options"),
            {"eta": 1.0},
            r"sample\.sampler_options\.eta is not an option of sampler 'ancestral'; its options: \['v'\]",
        ),
        (
            ("sample", "sampler_options"),
            {"v": 1.5},
            r"sample\.sampler_options\.v = 1\.5 is out of range: allowed 0\.0 <= value <= 1\.0",
        ),
        (
            ("sample", "sampler_options"),
            {"v": "high"},
            r"sample\.sampler_options\.v = 'high' must be a float",
        ),
        (
            ("evaluate", "metric_options"),
            {"kid": {"subsets": 2.5}},
            r"evaluate\.metric_options\.kid\.subsets = 2\.5 must be a int",
        ),
        (("evaluate", "metric_options"), {"fidd": {}}, r"evaluate\.metric_options\.fidd names no metric"),
        (
            ("evaluate", "metrics"),
            ["fid", "clip_score"],
            r"evaluate\.metrics\[1\] = 'clip_score' is not allowed",
        ),
        (
            ("train", "devices"),
            "two",
            r"train\.devices = 'two' is not allowed: give an integer >= 1 or one of \['all'\]",
        ),
        (("train", "devices"), 0, r"train\.devices = 0 is not allowed"),
    ]
    for (section, key), value, message in cases:
        bad = copy.deepcopy(raw)
        bad[section][key] = value
        with pytest.raises(ParamsError, match=message):
            params_from_dict(bad)
    ok = copy.deepcopy(raw)
    ok["train"]["devices"], ok["sample"]["sampler"], ok["sample"]["sampler_options"] = "all", "dpmpp_2m", {}
    assert params_from_dict(ok).train.devices == "all"


@pytest.mark.parametrize("section", ["train", "sample"])
def test_compile_is_on_off_or_a_named_variant_and_anything_else_is_refused_naming_it(section):
    from cfg.engine.device import COMPILE_MODES

    raw = _raw()
    for value in (True, False, *COMPILE_MODES):
        raw[section]["compile"] = value
        assert getattr(params_from_dict(raw), section).compile == value
    for value in ("fast", "max_autotune", 1, None):
        raw[section]["compile"] = value
        with pytest.raises(
            ParamsError,
            match=rf"^{section}\.compile = {re.escape(repr(value))} is not allowed: give true, false or one of "
            r"\['default', 'coordinate-descent', 'max-autotune', 'regional'\]",
        ):
            params_from_dict(raw)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("train", "lr"), float("inf"), r"^train\.lr = inf is not a finite number"),
        (("train", "lambda_min"), float("-inf"), r"^train\.lambda_min = -inf is not a finite number"),
        (("train", "grad_clip"), float("nan"), r"^train\.grad_clip = nan is not a finite number"),
        (("sample", "w"), [0.0, float("inf")], r"^sample\.w\[1\] = inf is not a finite number"),
        (("sample", "sampler_options"), {"v": float("nan")}, r"^sample\.sampler_options\.v = nan is not"),
        (
            ("search", "space"),
            {"train.lr": {"low": 0.001, "high": float("inf")}},
            r"^search\.space\.train\.lr\.high = inf is not a finite number",
        ),
    ],
)
def test_non_finite_numbers_are_refused_wherever_they_stand(path, value, message):
    # NaN passes every range check (each comparison is false) and inf passes lower bounds: both are refused
    raw = _raw()
    raw[path[0]][path[1]] = value
    with pytest.raises(ParamsError, match=message):
        params_from_dict(raw)


def test_the_lambda_range_ends_where_float32_alpha_and_sigma_underflow():
    import torch

    from cfg.maths.diffusion import alpha_sigma
    from cfg.study.config import LAMBDA_LIMIT

    inside = torch.tensor([-LAMBDA_LIMIT, LAMBDA_LIMIT])
    alpha, sigma = alpha_sigma(inside)
    assert (alpha > 0).all() and (sigma > 0).all(), "the whole allowed range keeps alpha and sigma positive"
    alpha, sigma = alpha_sigma(inside * 1.02)  # 89.1: just beyond, float32 gives 0
    assert alpha[0] == 0 and sigma[1] == 0, "the bound is where float32 really fails, not an arbitrary one"

    raw = _raw()
    raw["train"]["lambda_min"], raw["train"]["lambda_max"] = -LAMBDA_LIMIT, LAMBDA_LIMIT
    assert params_from_dict(raw).train.lambda_max == LAMBDA_LIMIT
    for key, value in (("lambda_max", 1e6), ("lambda_min", -100.0)):
        raw = _raw()
        raw["train"][key] = value
        with pytest.raises(
            ParamsError, match=rf"train\.{key} = {value} is out of range: .*<= 87\.33 .*alpha_sigma"
        ):
            params_from_dict(raw)


def test_ema_decay_zero_warns_that_it_averages_nothing():
    import warnings

    from cfg.study.config import ParamsWarning

    raw = _raw()
    raw["train"]["ema_decay"] = 0
    with pytest.warns(ParamsWarning, match=r"train\.ema_decay = 0\.0 averages nothing"):
        assert params_from_dict(raw).train.ema_decay == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParamsWarning)
        params_from_dict(_raw())  # the shipped decay: no warning


def test_per_class_w_outside_the_w_grid_warns_that_no_cell_gets_per_class_fid():
    import warnings

    from cfg.study.config import ParamsWarning

    raw = _raw()
    raw["evaluate"]["per_class_w"] = 0.4
    with pytest.warns(
        ParamsWarning, match=r"evaluate\.per_class_w = 0\.4 is not in sample\.w \[-1\.0, 0\.0, "
    ):
        params_from_dict(raw)
    raw["sample"]["w"].append(0.4)
    raw["evaluate"]["per_class_w"] = 0.4000000001  # as a float grid writes it
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParamsWarning)
        params_from_dict(raw)
        raw["evaluate"]["per_class_w"] = None  # none wanted
        params_from_dict(raw)


@pytest.fixture(scope="module")
def ten_class_extractor():
    """A real, untrained 10-class classifier as feature extractor, and reference statistics of 100 images."""
    import torch

    from cfg.eval.features import classifier_extractor, extract_features
    from cfg.eval.stats import reference_stats
    from cfg.nets.classifier import Classifier, ClassifierConfig

    torch.manual_seed(0)
    config = ClassifierConfig(in_channels=1, num_classes=10, image_size=8, width=4, feature_dim=8)
    ext = classifier_extractor(Classifier(config).eval())
    real = (torch.rand(100, 1, 8, 8) * 255).to(torch.uint8)
    return ext, reference_stats(extract_features(ext, real), ext, labels=torch.arange(100) % 10)


def _evaluate_as_the_stage_does(params, n: int, ext, ref) -> None:
    """The evaluate stage's computations on n random samples of one cell: the noise-FID baseline, then every
    metric of params.evaluate with its seed ranges and per-class FID."""
    import torch

    from cfg.eval.cells import evaluate_samples, metrics_from_params
    from cfg.eval.sanity import noise_fid
    from cfg.study.records import SampleSet

    e = params.evaluate
    noise = noise_fid(ext, ref, n, (1, 8, 8), seed=1)
    samples = SampleSet(
        images=(torch.rand(len(params.sample.w), n, 1, 8, 8) * 255).to(torch.uint8),
        labels=torch.arange(n) % 10,
        w=list(params.sample.w),
        classes=[str(c) for c in range(10)],
        p_uncond=0.1,
        guidance="cfg",
        guidance_options={},
        sampler="ancestral",
        sampler_options={},
        steps=8,
        seed=1,
        checkpoint="c.pt",
        train_run_id=None,
        checkpoint_params_hash="",
    )
    evaluate_samples(
        samples,
        ext,
        ref,
        metrics=metrics_from_params(e),
        seed_ranges=e.seed_ranges,
        per_class_w=e.per_class_w,
        noise_fid=noise,
    )


@pytest.mark.parametrize(
    "evaluate",
    [
        {},  # the shipped metrics, 2 seed ranges, per-class FID at w = 0 of digits' 10 classes
        {"per_class_w": None},  # precision_recall's k = 3, and 2 per seed range
        {
            "per_class_w": None,
            "seed_ranges": 3,
            "metrics": ["fid", "is"],
            "metric_options": {},
        },
        {"per_class_w": None, "seed_ranges": 1, "metrics": ["class_acc"], "metric_options": {}},
    ],
)
def test_the_fewest_samples_the_schema_allows_are_what_evaluate_really_needs(evaluate, ten_class_extractor):
    raw = _raw()
    raw["sample"]["w"] = [0.0]
    raw["evaluate"] |= evaluate
    raw["sample"]["n_samples"] = 1
    with pytest.raises(
        ParamsError, match=r"^sample\.n_samples = 1 is too few for evaluate: .*noise-FID"
    ) as e:
        params_from_dict(raw)
    least = int(re.search(r"give sample\.n_samples >= (\d+)", str(e.value)).group(1))
    raw["sample"]["n_samples"] = least
    params = params_from_dict(raw)
    _evaluate_as_the_stage_does(params, least, *ten_class_extractor)  # the minimum works ...
    raw["sample"]["n_samples"] = least - 1
    with pytest.raises(ParamsError, match=rf"^sample\.n_samples = {least - 1} is too few for evaluate"):
        params_from_dict(raw)
    with pytest.raises(ValueError) as failed:  # ... and one fewer fails in evaluate, as the schema says
        _evaluate_as_the_stage_does(params, least - 1, *ten_class_extractor)
    assert not isinstance(failed.value, ParamsError)
    print(f"{evaluate}: evaluate needs >= {least}; with {least - 1}: {failed.value}")


@pytest.mark.parametrize(
    "evaluate",
    [
        {},  # the shipped metrics: precision_recall's k = 3, per-class FID at w = 0 of digits' 10 classes
        {"per_class_w": None},  # precision_recall's k = 3 alone
        {"per_class_w": None, "metrics": ["fid", "is"], "metric_options": {}},  # fid's covariance
    ],
)
def test_the_fewest_test_images_the_schema_allows_are_what_evaluate_really_needs(
    evaluate, ten_class_extractor
):
    # data.max_test sizes the reference statistics; a reference too small for a metric used to pass the schema and
    # stop evaluate only after every model was trained and sampled
    from cfg.data.datasets import load_dataset
    from cfg.data.images import to_uint8
    from cfg.eval.features import extract_features
    from cfg.eval.stats import reference_stats

    ext = ten_class_extractor[0]
    raw = _raw()
    raw["sample"]["w"] = [0.0]
    raw["evaluate"] |= evaluate
    raw["data"]["max_test"] = 1
    with pytest.raises(ParamsError, match=r"^data\.max_test = 1 is too few for evaluate's reference") as e:
        params_from_dict(raw)
    least = int(re.search(r"give data\.max_test >= (\d+)", str(e.value)).group(1))
    raw["data"]["max_test"] = least
    params = params_from_dict(raw)

    def reference(m: int):  # as the reference stage makes it: the first m test images of the prepared data
        ds = load_dataset("digits", image_size=8, max_test=m)
        assert len(ds.test_y) == m
        return reference_stats(extract_features(ext, to_uint8(ds.test_x)), ext, labels=ds.test_y)

    _evaluate_as_the_stage_does(params, 40, ext, reference(least))  # the minimum works ...
    raw["data"]["max_test"] = least - 1
    with pytest.raises(ParamsError, match=rf"^data\.max_test = {least - 1} is too few"):
        params_from_dict(raw)
    with pytest.raises(ValueError) as failed:  # ... and one fewer fails in evaluate, as the schema says
        _evaluate_as_the_stage_does(params, 40, ext, reference(least - 1))
    assert not isinstance(failed.value, ParamsError)
    print(f"{evaluate}: evaluate needs data.max_test >= {least}; with {least - 1}: {failed.value}")


def test_seed_ranges_of_unequal_size_or_class_mix_are_refused_before_any_work(ten_class_extractor):
    # torch.chunk cut 401 samples into ranges of 201 and 200, and the cell recorded n_per_range = 201 for both
    raw = _raw()
    raw["sample"]["w"] = [0.0]
    valid = params_from_dict(raw)
    for n, sizes in ((401, "[201, 200]"), (30, "[15, 15]")):  # unequal counts; equal counts, unequal classes
        raw["sample"]["n_samples"] = n
        with pytest.raises(
            ParamsError,
            match=rf"^sample\.n_samples = {n} does not split evenly for evaluate: evaluate\.seed_ranges = 2 "
            rf"splits them into ranges of {re.escape(sizes)} .*a multiple of 20: 2 ranges x 10 classes of digits",
        ):
            params_from_dict(raw)
    # evaluate itself (a library caller, no schema) refuses unequal sizes, and warns of unequal class mixes: the
    # schema cannot know the classes of every data set (image_folder's come from its folders)
    with pytest.raises(ValueError, match=r"^401 samples do not split into 2 seed ranges of equal size"):
        _evaluate_as_the_stage_does(valid, 401, *ten_class_extractor)
    with pytest.warns(
        RuntimeWarning, match=r"the 2 seed ranges of 15 samples hold the 10 classes in other propor"
    ):
        _evaluate_as_the_stage_does(valid, 30, *ten_class_extractor)
    raw["sample"]["n_samples"] = 420
    assert params_from_dict(raw).sample.n_samples == 420
    # image_folder: its classes are its folders, so the schema asks only for equal sizes
    raw["data"] |= {"name": "image_folder", "root": "/nowhere", "image_size": 8}
    raw["sample"]["n_samples"] = 402
    assert params_from_dict(raw).sample.n_samples == 402
    raw["sample"]["n_samples"] = 401
    with pytest.raises(ParamsError, match=r"a multiple of 2: 2 ranges\)"):
        params_from_dict(raw)


def test_data_shapes_match_the_loaders():
    # the memory and per-class checks read channels, default side and classes here, before the data is prepared
    from cfg.data.datasets import load_dataset
    from cfg.study.config import DATA_SHAPES

    ds = load_dataset("digits", max_train=20, max_test=20)
    assert DATA_SHAPES["digits"] == (ds.channels, ds.image_size, ds.num_classes)
    fashion = ROOT.parent / "shared" / "data" / "FashionMNIST"
    if fashion.is_dir():
        ds = load_dataset("fashion_mnist", root=fashion, max_train=20, max_test=20)
        assert DATA_SHAPES["fashion_mnist"] == (ds.channels, ds.image_size, ds.num_classes)


def test_image_size_must_halve_through_the_unet_levels():
    raw = _raw()
    raw["model"]["channel_mult"] = [1, 2, 2, 2]  # three halvings: 8 -> 1 is fine, 12 is not
    raw["data"]["image_size"] = 12
    with pytest.raises(
        ParamsError, match=r"model\.channel_mult = \[1, 2, 2, 2\] .* multiple of 8, and data\.image_size = 12"
    ):
        params_from_dict(raw)


@pytest.mark.parametrize(
    ("section", "key", "value", "what"),
    [
        ("sample", "n_samples", 10**12, r"the (sample|evaluate) stage's"),
        (
            "sample",
            "batch_size",
            10**11,
            r"one sampler batch: \(batch_size // 8 w\) examples x 14 network rows",
        ),
        (
            "train",
            "batch_size",
            10**10,
            r"one training batch: batch_size / 1 process\(es\) x \d+ kB of activations",
        ),
        ("evaluate", "batch_size", 10**11, r"one extractor batch: .* the classifier's largest layer"),
    ],
)
def test_sizes_beyond_this_machines_memory_stop_the_stage_before_any_work(
    tmp_path, section, key, value, what
):
    # petabytes: more than any machine running this has; load_params is what every stage calls first
    raw = _raw()
    raw[section][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params_from_dict(raw)  # the schema alone accepts it: the machine's memory decides
    with pytest.raises(ParamsError) as refused:
        load_params(tmp_path / "params.yaml")
    message = str(refused.value)
    assert re.match(
        rf"params\.yaml: {section}\.{key} = {value} needs at least ~[\d.]+ (TB|PB) of memory for ", message
    )
    assert re.search(what, message), message
    assert re.search(
        rf"; this machine has [\d.]+ [GT]B of memory: lower {section}\.{key} \(at most ~[\d,]+ fit\)$",
        message,
    )


@pytest.mark.parametrize(
    "key", ["sample.n_samples", "sample.batch_size", "train.batch_size", "evaluate.batch_size"]
)
def test_the_largest_size_a_refusal_names_fits_and_a_larger_one_does_not(key):
    from cfg.study.config import _n_samples_unit, check_memory

    budget = 2 * 10**9
    section, name = key.split(".")
    raw = _raw()
    raw[section][name] = 10**9 if key == "sample.n_samples" else 10**7
    with pytest.raises(
        ParamsError, match=rf"^{re.escape(key)} = .*; this machine has 2 GB of memory: lower"
    ) as refused:
        check_memory(params_from_dict(raw), host_bytes=budget)
    fit = int(re.search(r"at most ~([\d,]+) fit", str(refused.value)).group(1).replace(",", ""))
    assert fit > 100
    raw[section][name] = fit
    check_memory(params_from_dict(raw), host_bytes=budget)
    raw[section][name] = int(fit * 1.02) + 8  # 8: sample.batch_size counts whole examples of 8 w
    if key == "sample.n_samples":  # a count that the seed ranges split evenly, as the fit named is
        unit = _n_samples_unit(params_from_dict(_raw()))
        assert fit % unit == 0 and unit == 20  # 2 seed ranges x digits' 10 classes
        raw[section][name] += -raw[section][name] % unit
    with pytest.raises(ParamsError, match=rf"^{re.escape(key)} = {raw[section][name]} needs"):
        check_memory(params_from_dict(raw), host_bytes=budget)


def test_activation_sizes_come_from_the_real_network():
    # a forward pass of the U-Net: activations grow with the pixels and the width, weights with the width only
    from cfg.nets.unet import UNet, UNetConfig, count_parameters
    from cfg.study.config import _layer_sizes

    config = {"image_size": 8, "in_channels": 1, "num_classes": 10, "base_width": 16, "channel_mult": (1, 2)}
    config |= {"attention_resolutions": (), "head_channels": 16}
    peak, every, n = _layer_sizes("unet", tuple(config.items()))
    assert n == count_parameters(UNet(UNetConfig(**config)))
    peak2, every2, n2 = _layer_sizes("unet", tuple((config | {"image_size": 16}).items()))
    assert (peak2, n2) == (4 * peak, n) and 3.5 * every < every2 <= 4 * every  # the embeddings do not grow
    peak3, every3, n3 = _layer_sizes("unet", tuple((config | {"base_width": 32}).items()))
    assert 1.9 * peak < peak3 <= 2 * peak and n3 > 3.5 * n


def test_cuda_graph_needs_one_train_process():
    raw = _raw()
    raw["train"] |= {"cuda_graph": True, "devices": 2}
    with pytest.raises(
        ParamsError, match=r"train\.cuda_graph = true needs one train process .* train\.devices = 2"
    ):
        params_from_dict(raw)
    raw["train"]["devices"] = 1
    assert params_from_dict(raw).train.cuda_graph


@pytest.mark.parametrize(
    "settings", [{"compile": False, "cuda_graph": True}, {"compile": True, "cuda_graph": False}], ids=str
)
def test_compile_update_needs_the_compiled_cuda_graph_step(settings):
    """train.compile_update compiles the update of the CUDA-graphed step along with the network: alone it would
    do nothing, so it is refused, naming both settings."""
    raw = _raw()
    raw["train"] |= settings | {"compile_update": True}
    with pytest.raises(
        ParamsError,
        match=rf"train\.compile_update = true .* got compile = {settings['compile']!r}, "
        rf"cuda_graph = {settings['cuda_graph']}",
    ):
        params_from_dict(raw)
    raw["train"] |= {"compile": "default", "cuda_graph": True}
    assert params_from_dict(raw).train.compile_update


def test_a_p_uncond_without_decimal_point_is_refused_and_accepted_ones_name_dvcs_folders(tmp_path):
    """DVC's foreach writes `${item}` as the value is written: an integer 0 or 1 names train@0 and
    models/p_uncond=0, while the stages find a model's folder from the number (p_uncond_name: p_uncond=0.0). So an
    integer is refused before any stage runs, and for values that are accepted DVC's names are the stages' names."""
    import shutil

    from cfg.study.records import p_uncond_name
    from tests.conftest import run

    for bad, i in (([0, 0.5], 0), ([0.1, 1], 1)):
        raw = _raw()
        raw["train"]["p_uncond"] = bad
        with pytest.raises(
            ParamsError,
            match=rf"train\.p_uncond\[{i}\] = {bad[i]} must be written with a decimal "
            rf"point \({bad[i]}\.0\): DVC names",
        ):
            params_from_dict(raw)
    good = [0.0, 0.25, 1.0, 0.30000000000000004]  # the last: a float whose shortest repr has 17 digits
    raw = _raw()
    raw["train"]["p_uncond"] = good
    params = params_from_dict(raw)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    run(["dvc", "init", "--no-scm", "-q"], tmp_path)
    listed = run(["dvc", "stage", "list"], tmp_path).stdout
    for p in params.train.p_uncond:
        name = p_uncond_name(p)
        assert re.search(
            rf"^train@{re.escape(name.split('=')[1])}\s+Outputs models/{re.escape(name)}$", listed, re.M
        ), listed


def test_exponent_floats_read_as_dvc_reads_them(tmp_path):
    # PyYAML (YAML 1.1) read `lr: 2e-3` as the string '2e-3' and refused it ("must be a number"); DVC's ruamel.yaml
    # (YAML 1.2) reads a float, so a params.yaml that DVC runs was refused by every stage
    from dvc.utils.serialize import parse_yaml

    from cfg.io import load_yaml

    text = (ROOT / "params.yaml").read_text()
    assert text.count("  lr: 0.002\n") == 2
    text = text.replace("  lr: 0.002\n", "  lr: 2e-3\n")
    (tmp_path / "params.yaml").write_text(text)
    assert load_yaml(text) == parse_yaml(text, "params.yaml")
    params = load_params(tmp_path / "params.yaml")
    assert params.train.lr == params.classifier.lr == 0.002
    for value, dvc in (
        ("1e-4", 1e-4),
        ("-3E+2", -300.0),
        ("10", 10),
        ("1_000", 1000),
        ("1e", "1e"),
        ("'1e-4'", "1e-4"),
    ):
        assert load_yaml(f"x: {value}") == parse_yaml(f"x: {value}", "p") == {"x": dvc}, value
