-- Ledger fast path (issue 2 benchmark): deduct_points in two statements for the common case.
--
-- 002's deduct_points runs ledger_validate (two lookups), then ledger_apply, which looks the key up,
-- updates the balance and inserts the ledger row: five statements in three SECURITY DEFINER calls,
-- each statement with its own executor start-up. On the 2-core machine that cost ~190 us of CPU per
-- deduction against ~160 us for pgbench's simple-update (0.85-0.9x of its throughput). Here the
-- common case -- a valid call with a key, a user whose balance covers the amount and who holds no
-- reservation -- is one UPDATE that checks the argument rules in its WHERE clause, then the INSERT of
-- the ledger row (~160 us, 1.0-1.05x; see README "Ledger throughput benchmark").
--
-- Everything else takes the unchanged path, so its behaviour is 002's (and that of any later
-- ledger_validate / ledger_apply, e.g. 003's reservations): when the UPDATE changes no row,
-- deduct_points calls public.ledger_validate (same SQLSTATEs and messages, same order of checks)
-- and public.ledger_apply (replay of a used key, CR001 with its detail, CR002, a generated key for a
-- NULL key, reservation work). The slow path is taken for: a bad argument, a NULL key, a user without
-- a balance row, insufficient credits, any user with reserved > 0 -- and for a retried key whose
-- balance no longer covers the amount.
--
-- Idempotency: the fast path does not look the key up first (that lookup was ~5% of the call). The
-- INSERT's ON CONFLICT on the unique key is the check, as it already was for concurrent callers in
-- 002: on a conflict the call undoes its balance change (the row is still locked by it) and answers
-- with the first result (duplicate = true), or CR002 when the key named another write. The answer is
-- the same as 002's; the difference is that such a retry briefly locks the user's balance row and
-- leaves its updated_at moved (002's concurrent-race path did the same).
--
-- Concurrency is 002's: the UPDATE locks the balance row and re-checks balance and reserved on the
-- row version it waited for (EvalPlanQual), so exactly N of N one-credit deductions succeed on N
-- credits whatever the number of clients.
--
-- For later migrations (010+ lifecycle, lots): deduct_points no longer calls ledger_apply for the
-- common case. A migration that changes what a deduction does (consume lots, expire first, ...) must
-- CREATE OR REPLACE deduct_points too: carry this fast path forward with the new work in it, or make
-- deduct_points a plain wrapper of ledger_validate + ledger_apply again.

CREATE OR REPLACE FUNCTION public.deduct_points(p_user_id uuid, p_amount bigint, p_transaction_type text,
                                                p_description text, p_idempotency_key text DEFAULT NULL,
                                                p_metadata jsonb DEFAULT '{}'::jsonb)
RETURNS TABLE (new_balance bigint, transaction_id bigint, duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_new bigint;
    v_id bigint;
BEGIN
    -- argument rules that need no lookup; the maximum and the type's direction are in the WHERE clause
    IF p_user_id IS NOT NULL AND p_amount > 0 AND length(p_idempotency_key) BETWEEN 1 AND 512 THEN
        UPDATE public.points_balances b
           SET balance = b.balance - p_amount, lifetime_spent = b.lifetime_spent + p_amount, updated_at = now()
         WHERE b.user_id = p_user_id
           AND b.reserved = 0
           AND b.balance >= p_amount
           AND p_amount <= (SELECT s.value::bigint FROM public.ledger_settings s
                             WHERE s.name = 'max_operation_amount')
           AND EXISTS (SELECT 1 FROM public.ledger_transaction_types tt
                        WHERE tt.name = p_transaction_type AND tt.direction IN (0, -1))
        RETURNING b.balance INTO v_new;

        IF v_new IS NOT NULL THEN
            INSERT INTO public.points_transactions AS t
                (user_id, amount, balance_after, transaction_type, description, idempotency_key, metadata)
            VALUES (p_user_id, -p_amount, v_new, p_transaction_type, p_description, p_idempotency_key,
                    coalesce(p_metadata, '{}'::jsonb))
            ON CONFLICT (idempotency_key) DO NOTHING
            RETURNING t.id INTO v_id;

            IF v_id IS NOT NULL THEN
                new_balance := v_new;
                transaction_id := v_id;
                duplicate := false;
                RETURN NEXT;
                RETURN;
            END IF;

            -- the key is taken (a retry, or a concurrent caller won): undo our change, the row is
            -- still locked by us, and answer with the first result or CR002
            UPDATE public.points_balances b
               SET balance = b.balance + p_amount, lifetime_spent = b.lifetime_spent - p_amount
             WHERE b.user_id = p_user_id;
            RETURN QUERY SELECT * FROM public.ledger_replay(p_idempotency_key, p_user_id, -p_amount,
                                                            p_transaction_type);
            RETURN;
        END IF;
    END IF;

    -- everything else: 002's path, with its refusals and its replay of a used key
    PERFORM public.ledger_validate(p_user_id, p_amount, p_transaction_type, (-1)::smallint, p_idempotency_key);
    RETURN QUERY SELECT * FROM public.ledger_apply(p_user_id, -p_amount, p_transaction_type, p_description,
                                                   p_idempotency_key, p_metadata);
END $$;

REVOKE EXECUTE ON FUNCTION public.deduct_points(uuid, bigint, text, text, text, jsonb) FROM PUBLIC;
