-- Deductions stop paying for an index they never use (issue 2 benchmark, with lots).
--
-- points_transactions_type_created_idx (transaction_type, created_at) from 001 was maintained on every
-- ledger insert, and generation deductions are nearly all of them. Nothing looks deductions up by type
-- and time: the audit reads the ledger whole (checks/snapshot.py), failed deductions live in their own
-- table, and the monitor finds a user's grants through (user_id, id). What the index is for -- grants,
-- fixes, refunds, expiries of a period -- keeps it, as a partial index without the deductions.
DROP INDEX IF EXISTS public.points_transactions_type_created_idx;
CREATE INDEX points_transactions_type_created_idx ON public.points_transactions (transaction_type, created_at)
    WHERE transaction_type <> 'generation_deduction';
