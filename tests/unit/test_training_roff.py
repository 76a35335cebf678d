"""The roff cleaner keeps a man page's prose and drops its macros, escapes and comments."""

from expertmesh.training.roff import roff_to_text, unescape

PAGE = r""".\" Copyright and other comments must not leak
.TH LS 1 "2022" "coreutils"
.SH NOM
ls \- afficher le contenu
.SH DESCRIPTION
Afficher les informations des \fIFICHIER\fPs,
triées par défaut.
.TP
\fB\-a\fR, \fB\-\-all\fR
inclure les entrées «\ .\ »
.PP
Voir
.BR stat (2)
et
.B ls
pour plus.
.de XX
this macro body is not text
..
.TS
tab(;);
l l.
a;b
.TE
.nf
int main(void);
    return 0;
.fi
"""


def test_prose_is_kept_and_reflowed():
    text = roff_to_text(PAGE)
    assert "NOM\n\nls - afficher le contenu" in text
    assert "Afficher les informations des FICHIERs, triées par défaut." in text
    assert "-a, --all\n\ninclure les entrées « . »" in text
    assert "Voir stat(2) et ls pour plus." in text


def test_macros_comments_and_tables_are_dropped():
    text = roff_to_text(PAGE)
    for leaked in ("Copyright", ".TH", "\\f", "macro body", "tab(;)", "a;b", "coreutils"):
        assert leaked not in text


def test_no_fill_blocks_keep_their_lines():
    assert "int main(void);\n    return 0;" in roff_to_text(PAGE)


def test_unescape_named_glyphs_and_unicode():
    assert unescape(r"\(aqx\(aq \(em \[u00E9] \e \&.") == "'x' — é \\ ."
