"""Static files of the labeler web page (a package so that wheels carry them)."""
