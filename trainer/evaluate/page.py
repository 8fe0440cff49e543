"""report.html: one self-contained page with every number and picture of an evaluation (and
candidate vs production side by side when both were scored). Every user string is escaped."""

import base64
import html

from trainer.evaluate import metrics as metrics_lib
from trainer.formats import jobdir
from trainer.infra import storage


def write_html(output_url, metrics, pictures):
    """Writes report.html: the numbers, the per-class table, every picture of `{name: PNG bytes}`
    (embedded), and candidate vs production when `metrics["comparison"]` holds both. Returns its URL."""
    escape = html.escape
    rows = "".join(f"<tr><td>{escape(name)}</td><td>{row['precision']:.4f}</td><td>{row['recall']:.4f}</td>"
                   f"<td>{row['f1']:.4f}</td><td>{row['support']}</td></tr>"
                   for name, row in metrics["per_class"].items())
    headline = [("split", metrics.get("split")), ("examples", metrics["examples"]),
                ("accuracy", f"{metrics['accuracy']:.4f}"),
                ("balanced accuracy", f"{metrics['balanced_accuracy']:.4f}"),
                ("macro-F1", f"{metrics['macro_f1']:.4f}"), ("loss", f"{metrics['loss']:.4f}"),
                ("expected calibration error", f"{metrics['calibration']['ece']:.4f}")]
    if metrics.get("roc_auc") is not None:
        headline += [("ROC AUC", f"{metrics['roc_auc']:.4f}"), ("PR AUC", f"{metrics['pr_auc']:.4f}")]
    headline += [("model", metrics.get("model")), ("model id", metrics.get("model_id")), ("data", metrics.get("data"))]
    summary = "".join(f"<tr><th>{escape(str(key))}</th><td>{escape(str(value))}</td></tr>" for key, value in headline)
    trained = "".join(f"<tr><th>{escape(key.replace('_', ' '))}</th><td>{escape(_shown(value))}</td></tr>"
                      for key, value in (metrics.get("training") or {}).items() if value is not None)
    if trained:
        trained = f"<h2>How the model was trained</h2><table>{trained}</table>"
    comparison = ""
    versus = metrics.get("comparison")
    if versus and "p_value" in versus:
        recalls = "".join(f"<tr><td>{escape(name)}</td><td>{row['candidate']:.4f}</td><td>{row['production']:.4f}</td>"
                          f"<td>{row['support']}</td></tr>" for name, row in versus["per_class_recall"].items())
        comparison = (
            f"<h2>Candidate vs production {escape(versus['production']['version'])}, on the same "
            f"{versus['examples']} examples</h2><table class=side><tr><th></th><th>candidate</th><th>production</th>"
            f"</tr><tr><th>accuracy</th><td>{versus['candidate_accuracy']:.4f}</td>"
            f"<td>{versus['production_accuracy']:.4f}</td></tr><tr><th>right where the other is wrong</th>"
            f"<td>{versus['only_candidate_correct']}</td><td>{versus['only_production_correct']}</td></tr></table>"
            f"<p>McNemar's exact test: p = {versus['p_value']:.4g}. Decision: "
            f"<b class={'pass' if versus['passed'] else 'fail'}>{'promote' if versus['passed'] else 'do not promote'}"
            f"</b>: {escape(versus['reason'])}</p><table><tr><th>class</th><th>recall, candidate</th>"
            f"<th>recall, production</th><th>support</th></tr>{recalls}</table>")
    elif versus:
        comparison = f"<h2>Candidate vs production</h2><p class=fail>{escape(versus['reason'])}</p>"
    confused = "".join(f"<tr><td>{escape(pair['true'])}</td><td>{escape(pair['predicted'])}</td>"
                       f"<td>{pair['count']}</td><td>{pair['share']:.1%}</td></tr>"
                       for pair in metrics_lib.most_confused(metrics))
    if confused:
        confused = ("<h2>Most confused pairs</h2><table><tr><th>true class</th><th>predicted as</th><th>images</th>"
                    f"<th>share of the true class</th></tr>{confused}</table>")
    images = "".join(f"<figure><img alt=\"{escape(name)}\" src=\"data:image/png;base64,"
                     f"{base64.b64encode(png).decode()}\"><figcaption>{escape(name)}</figcaption></figure>"
                     for name, png in pictures.items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation: {escape(str(metrics.get('model')))}</title>
<style>body{{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}
img{{max-width:100%}}figure{{margin:1em 0}}.pass{{color:#060}}.fail{{color:#a00}}</style></head>
<body><h1>Evaluation</h1><table>{summary}</table>{trained}{comparison}
<h2>Per class</h2><table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>
{rows}</table>
{confused}
<h2>Pictures</h2>{images}</body></html>
"""
    url = storage.join(output_url, jobdir.REPORT)
    storage.write_text(url, page)
    return url


def _shown(value):
    """A training setting as the page shows it: `{"head": 10, "fine_tune": 6}` as `head 10, fine_tune 6`."""
    if isinstance(value, dict):
        return ", ".join(f"{key} {item}" for key, item in value.items())
    return str(value)
