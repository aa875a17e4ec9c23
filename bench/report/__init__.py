"""Step 4: leaderboards, comparisons with the papers' tables, HTML reports and figures, from records alone."""
