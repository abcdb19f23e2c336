-- Credit lifecycle, part 4 (issue 6): what the lifecycle audit rules read, kept cheap at scale.
--
-- refunds_bounded groups the refund rows by the deduction their metadata.refund_of names. Refunds are
-- a small share of a ledger of millions of rows: this partial index lets the audit's snapshot read them
-- without scanning the whole ledger (it holds refund rows only, so other writes never touch it).
CREATE INDEX IF NOT EXISTS points_transactions_refunds_idx
    ON public.points_transactions (id) WHERE transaction_type = 'refund';
