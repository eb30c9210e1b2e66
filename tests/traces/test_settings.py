"""GenerateConfig's checks on the vLLM options it validates before anything loads (tribunal.traces.settings)."""

import pytest

from tribunal.errors import TribunalError
from tribunal.traces.settings import GenerateConfig


def config(**options):
    return GenerateConfig(out="x.h5", **options)


@pytest.mark.parametrize("options, needle", [
    (dict(engine="vllm", vllm_args="{max_num_seqs: 4}"), "is not JSON"),
    (dict(engine="vllm", vllm_args="[1, 2]"), "give a JSON object"),
    (dict(engine="vllm", vllm_args='{"seed": 3, "dtype": "half"}'),
     "sets dtype, seed, which tribunal sets itself: use --compute-dtype, --seed"),
    (dict(engine="vllm", vllm_args='{"enable_prefix_caching": true}'), "use --capture"),
    (dict(vllm_args='{"max_num_seqs": 4}'), "--vllm-args is for --engine vllm"),
    (dict(capture="forward"), "--capture forward is for --engine vllm"),
    (dict(engine="vllm", capture="both"), "--capture 'both': choose inline, forward"),
    (dict(engine="vllm", capture="forward", monitor="P"), "use --capture inline"),
])
def test_vllm_options_that_cannot_work_are_refused_naming_what_to_use(options, needle):
    with pytest.raises(TribunalError) as error:
        config(**options).validate()
    assert needle in str(error.value)


def test_vllm_args_reach_the_engine_as_a_dict():
    assert config(engine="vllm", vllm_args='{"max_num_seqs": 4}').validate().vllm_engine_args() == {"max_num_seqs": 4}
    assert config(engine="vllm").vllm_engine_args() == {}
