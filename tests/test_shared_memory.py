"""Shared-memory windows end cleanly: the job's exit status under another netmod.

MPICH's ofi netmod fails ``MPI_Finalize`` ("fabricclose failed ... Device or
resource busy") while a window is still allocated, so ``mpnn.train`` frees the
dataset's and the hierarchical Allreduce's windows once training is over
(``Setup.close``). UCX, the default netmod, does not mind, so this runs the
job under ofi to see it.
"""

import pytest

from conftest import train_cli

OFI = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"}


@pytest.mark.parametrize("extra", [[], ["--allreduce", "hierarchical"],
                                   ["--allreduce", "hierarchical", "--pp", "2"]],
                         ids=["shared-data", "hierarchical", "hierarchical-pipeline"])
def test_windows_are_freed_before_finalize(extra):
    code, out = train_cli("--epochs", "1", "--hidden", "16,16", "--quiet", *extra, ranks=4,
                          env=OFI)
    assert code == 0, out
    assert "Finalize" not in out, out
