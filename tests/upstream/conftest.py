"""The fixtures of the official forks' comparisons (test_vispruner_official.py, test_cdpruner_official.py,
test_fastervlm_official.py): each reads its test module's FORK_NAME, REPO_VARIABLE, DEFAULT_REPO, PROBE, CASES
and DTYPES. The other modules here define their own fixtures of these names, which take precedence."""

import pytest
from test_vispruner_official import case_images, exported_official_code, run_official, run_ours, upstream_interpreter


@pytest.fixture(scope="module")
def official_code(request, tmp_path_factory) -> str:
    module = request.module
    return exported_official_code(module.REPO_VARIABLE, module.DEFAULT_REPO, module.FORK_NAME,
                                  str(tmp_path_factory.mktemp("official-code")))


@pytest.fixture(scope="module")
def upstream_python(request, official_code, tmp_path_factory) -> str:
    return upstream_interpreter(official_code, request.module.FORK_NAME,
                                str(tmp_path_factory.mktemp("upstream-check")))


@pytest.fixture(scope="module")
def images(request, tmp_path_factory) -> list[str]:
    return case_images(request.module.CASES, tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def official(request, upstream_python, official_code, tiny_checkpoint, images, tmp_path_factory) -> dict:
    module = request.module
    return run_official(upstream_python, official_code, tiny_checkpoint, module.CASES, images, module.DTYPES,
                        tmp_path_factory.mktemp("probe"), probe=module.PROBE)


@pytest.fixture(scope="module")
def ours(request, official, tiny_checkpoint, images) -> dict:
    """`{dtype: {numerics: [per case]}}`; after `official`, so nothing of ours runs when it is skipped."""
    module = request.module
    return {dtype: run_ours(tiny_checkpoint, module.CASES, images, dtype, ("sdpa", "released"))
            for dtype in module.DTYPES}
