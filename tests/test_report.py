"""base/report.py: the one report type and its Markdown writer."""
from ctxdraft.selfdraft.base.report import Report, Table


def test_markdown_layout():
    report = Report("title", ["a paragraph\n- a list line", Table(["", "qa", "overall"], [["x", "1.0", "2.0"]],
                                                                 ["---", "---:", "---:"])])
    report.add("last")
    assert report.to_markdown() == ("## title\n\na paragraph\n- a list line\n\n| | qa | overall |\n| --- | ---: | ---: |\n"
                                    "| x | 1.0 | 2.0 |\n\nlast\n")  # an empty header cell is "| |", as the tables had
    assert Report(None, ["only"]).to_markdown() == "only\n"
    assert Table(["a", "b"]).lines()[1] == "| --- | --- |"  # left-aligned unless told
