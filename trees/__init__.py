"""Tree search: from acceptance statistics (measured or replayed) to the tree sets PPD decodes with. The decoder
(decoding/) does not import this package; it takes the tree sets built here."""
