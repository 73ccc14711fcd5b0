"""Error analysis on a real model that plain int8 breaks: magika (file-type classifier).

Quantizing every op collapses its output (its decomposed layer norms square small differences).
The layerwise view must name the layers responsible, and the fix it prints, applied as
overrides, must restore the output and the predictions.
"""

import numpy as np

import edgequant
from tests.conftest import extract, run
from tests.integration.realdata import labelled_files


def test_layerwise_names_the_culprits_and_its_fix_restores_magika(tmp_path):
    model = extract("magika", "magika/models/standard_v3_3/model.onnx")
    calib = [{"bytes": x} for _, x in labelled_files(14, part=0)]
    held_out = [{"bytes": x} for _, x in labelled_files(10, part=1)]
    int8 = edgequant.quantize(str(model), calib, repair=False)
    report = edgequant.analyze(int8.float_model, int8.model, held_out, num_samples=16)
    assert report.outputs[0].metrics.cosine < 0.8 and report.outputs[0].metrics.flagged
    worst = report.worst_layers(3)
    assert all("LayerNorm" in r.node for r in worst), [r.node for r in worst]
    assert report.layerwise and all(r.output.cosine > 0.95 for r in report.layerwise if "LayerNorm" not in r.node
                                    and not r.output.nonfinite)
    fixes = report.fixes(3)
    assert len(fixes) == 3 and fixes[0].precision == "float"  # its Rsqrt turns a rounded-to-zero input into inf

    def agreement(q):
        return np.mean([run(int8.float_model, f)[0].argmax() == run(q, f)[0].argmax() for f in held_out])

    def cosine_with(overrides):
        fixed = edgequant.quantize(str(model), calib, overrides=overrides, repair=False)
        rep = edgequant.analyze(fixed.float_model, fixed.model, held_out, mode="graphwise", num_samples=16)
        return rep.outputs[0].metrics.cosine, fixed.model

    before = report.outputs[0].metrics.cosine
    after3, model3 = cosine_with(fixes)
    after8, _ = cosine_with(report.fixes(8))
    assert after3 > 0.9 and after3 > before + 0.5
    assert after8 > 0.99
    assert agreement(int8.model) < 0.5 and agreement(model3) >= 0.85  # top-1 agreement with float
    folder = edgequant.write_report(report, tmp_path / "magika-report")
    assert "LayerNorm" in (folder / "report.md").read_text()
