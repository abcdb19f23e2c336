-- The deduction's tables keep the CHECKs that guard money and lose the ones that restate them
-- (issue 2 benchmark).
--
-- PostgreSQL reads every CHECK constraint of a table back from its stored text (stringToNode) and
-- prepares it again in each statement that writes the table, before the first row: on the 2-core machine
-- ~12-16k instructions per constraint, 8 constraints on the three tables a deduction writes, ~130k of the
-- ~640k instructions of one deduct_points call (benchmarks/instructions.py; without any CHECK: ~507k).
-- The cost is per expression node, so merging constraints saves little (~4k for four into one); only
-- dropping nodes does.
--
-- Kept, as before: points_lots.remaining >= 0, points_transactions.amount <> 0, the description limit.
-- points_balances: balance >= 0 and 0 <= reserved <= balance were two constraints; the second implies the
-- first, so one constraint, named points_balances_balance_check as the balance's was, now says both:
-- balance >= reserved >= 0.
-- Dropped:
-- - points_balances.lifetime_earned >= 0 and lifetime_spent >= 0: statistics the functions keep beside
--   the balance; nothing spends or grants from them, and the audit's invariants are on the balance, the
--   ledger and the lots.
-- - points_transactions.balance_after >= 0: the writing function copies it from the balance row it has
--   just updated, which the constraint above holds at >= 0; the audit's balance_after chain rule checks
--   every row's value against the ledger's running sum.
ALTER TABLE public.points_balances
    DROP CONSTRAINT points_balances_balance_check,
    DROP CONSTRAINT points_balances_check,
    DROP CONSTRAINT points_balances_lifetime_earned_check,
    DROP CONSTRAINT points_balances_lifetime_spent_check,
    ADD CONSTRAINT points_balances_balance_check CHECK (balance >= reserved AND reserved >= 0);

ALTER TABLE public.points_transactions DROP CONSTRAINT points_transactions_balance_after_check;
