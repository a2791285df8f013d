-- A regeneration's link, kept on the row of the trace it regenerated beside the rating: who
-- regenerated it last (`regenerated_by`, that request's trace id) and how it was detected
-- (`regeneration_how`: 'explicit' or 'implicit'). An explicit rating replaces the implicit -1
-- a regeneration leaves (and is never replaced by one) but keeps these, so GET
-- /admin/traces/{id} lists every end user's latest regeneration whatever they rated. Rows
-- written before this migration carry the link in their labels only (`regenerated_by:<id>`,
-- `how:<how>`), which are still written and still read.
ALTER TABLE feedback ADD COLUMN regenerated_by TEXT;
ALTER TABLE feedback ADD COLUMN regeneration_how TEXT;
