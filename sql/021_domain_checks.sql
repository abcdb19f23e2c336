-- deduct_points' single-column CHECKs as domain constraints, and three statements of its fast path made
-- cheaper to start (issue 2 and issue 6 benchmarks).
--
-- Measured with callgrind (`python -m benchmarks.instructions`: instructions per call on a single-user
-- backend, the same count for the same work whatever else the machine does), against sql/020:
--   deduct_points 550k -> 492k, single_lot 559k -> 499k, many_lots 677k -> 610k
--   (pgbench's simple-update transaction: 213k). The parts below were measured one at a time.
--
-- 1. Domains. PostgreSQL reads a table's CHECK constraints back from their stored text (stringToNode)
--    and plans them again (expression_planner) at the executor start of every statement that writes
--    the table: ~10-20k instructions per constraint per statement. A domain's constraints are read and
--    planned once per backend into the type cache; a statement only sets up their evaluation. So the
--    single-column CHECKs of the tables a deduction writes are now constraints of the columns' types,
--    with the same conditions and the same names, refused with the same SQLSTATE (23514,
--    check_violation; the message names the domain instead of the table):
--      points_transactions.amount       public.ledger_amount       points_transactions_amount_check       (<> 0)
--      points_transactions.description  public.ledger_description  points_transactions_description_length (<= 1000
--                                       characters; NOT VALID, as 015's CHECK was: older rows stay as written)
--      points_lots.remaining            public.lot_remaining       points_lots_remaining_check            (>= 0)
--    ~-27k per deduction for the ledger's two, ~-7k for the lot's (~-14k on a many-lot draw: one per lot
--    statement). points_balances keeps its CHECK: balance >= reserved spans two columns, which no domain
--    can say (splitting off balance >= 0 and reserved >= 0 as domains measured only -6k).
--    A domain is a column's type for every writer, so the owner, the functions' fast and slow paths and
--    a direct INSERT meet the same refusal; clients still see bigint and text (PostgreSQL describes a
--    domain column by its base type). Arithmetic on the columns yields the base type, as before.
--    Cost of this migration on a big database: the column types change without a rewrite (each domain
--    is created without its constraint, so the old values need no coercion), but the ledger is read
--    once to validate the amount constraint, and points_lots is rewritten (its generated column spent
--    depends on remaining, and PostgreSQL will not change the type of a column a generated column
--    reads: spent is dropped and added again, which rewrites the table, and its partial index
--    points_lots_open_order_idx is built again). The view points_lot_draws reads amount and is made
--    again unchanged (same columns, same types; `credits migrate` grants the service role SELECT on it
--    again, as on every table). All of it under the migration's ACCESS EXCLUSIVE locks on the two
--    tables; the columns' planner statistics are collected again at the end.
-- 2. The compiled constants (sql/019) are tested by the IF that chooses the fast path, not in the balance
--    UPDATE's WHERE, where they made the plan a gating Result node over the index scan (~-4k). A false
--    one leads to the slow path, as the row the UPDATE then did not find did.
-- 3. The lot to draw is found by its ctid (a TID scan) instead of its id (a second index descent):
--    ~-8k a draw. The subquery and the UPDATE read the same snapshot, and no one else can change the
--    row in between: every writer of a user's lots holds the user's balance row lock (sql/011), which
--    this call took in the statement before.
-- 4. A taken idempotency key is caught as the unique index's refusal (unique_violation on
--    points_transactions_idempotency_key_key, and only that constraint) instead of ON CONFLICT DO NOTHING,
--    whose arbiter check and speculative insertion cost more than the subtransaction of the exception
--    block (~-11k). The outcome is ON CONFLICT's: a concurrent writer of the same key is waited for,
--    one row per key, the loser undoes its balance and draws and answers from the existing row
--    (duplicate = true, or ledger_replay's refusal of a key reused with other arguments). What it costs besides: a
--    deduction takes two transaction ids (the subtransaction writes the row), so the ledger's ids
--    advance twice as fast towards anti-wraparound vacuuming; a retried key leaves one dead row version.
-- 5. refund_generation returned a ledger row's amount through RETURN QUERY, which requires the result's
--    types exactly: it casts the domain back to bigint (no other function returns these columns so).

CREATE DOMAIN public.ledger_amount AS bigint;
CREATE DOMAIN public.ledger_description AS text;
CREATE DOMAIN public.lot_remaining AS bigint;
COMMENT ON DOMAIN public.ledger_amount IS
    'points_transactions.amount: signed credits, never 0 (a domain constraint, not a table CHECK: sql/021)';
COMMENT ON DOMAIN public.ledger_description IS
    'points_transactions.description: at most 1,000 characters (sql/015; a domain constraint since sql/021)';
COMMENT ON DOMAIN public.lot_remaining IS
    'points_lots.remaining: credits left in a lot, never negative (a domain constraint since sql/021)';

DROP VIEW public.points_lot_draws;

ALTER TABLE public.points_transactions
    ALTER COLUMN amount TYPE public.ledger_amount,
    ALTER COLUMN description TYPE public.ledger_description,
    DROP CONSTRAINT points_transactions_amount_check,
    DROP CONSTRAINT points_transactions_description_length;

DROP INDEX public.points_lots_open_order_idx;
ALTER TABLE public.points_lots DROP COLUMN spent;
ALTER TABLE public.points_lots
    ALTER COLUMN remaining TYPE public.lot_remaining,
    DROP CONSTRAINT points_lots_remaining_check,
    ADD COLUMN spent boolean GENERATED ALWAYS AS (remaining = 0) STORED;
CREATE INDEX points_lots_open_order_idx ON public.points_lots (user_id, priority, expires_at, id) WHERE NOT spent;

-- 018's view, as it was
CREATE VIEW public.points_lot_draws AS
SELECT c.transaction_id, c.lot_id, c.user_id, c.amount, c.created_at FROM public.points_lot_consumptions c
UNION ALL
SELECT t.id, t.lot_id, t.user_id, -t.amount, t.created_at FROM public.points_transactions t
 WHERE t.lot_id IS NOT NULL
UNION ALL
SELECT t.id, x.lot_id, t.user_id, x.amount, t.created_at
  FROM public.points_transactions t CROSS JOIN LATERAL unnest(t.lot_ids, t.lot_amounts) AS x (lot_id, amount)
 WHERE t.lot_ids IS NOT NULL;

ALTER DOMAIN public.ledger_amount ADD CONSTRAINT points_transactions_amount_check CHECK (VALUE <> 0);
ALTER DOMAIN public.ledger_description
    ADD CONSTRAINT points_transactions_description_length CHECK (length(VALUE) <= 1000) NOT VALID;
ALTER DOMAIN public.lot_remaining ADD CONSTRAINT points_lots_remaining_check CHECK (VALUE >= 0);

ANALYZE public.points_transactions (amount, description);
ANALYZE public.points_lots;

-- 019's deduct_points with the constants in the IF (2), the lot by its ctid (3) and the taken key caught
-- (4); everything else -- the fast path's other conditions, what the row records, the lots drawn one
-- statement each, the fallback through ledger_validate / ledger_apply, the undo when the key is taken,
-- the replay -- as 019 wrote it.
CREATE OR REPLACE FUNCTION public.deduct_points(p_user_id uuid, p_amount bigint, p_transaction_type text,
                                                p_description text, p_idempotency_key text DEFAULT NULL,
                                                p_metadata jsonb DEFAULT '{}'::jsonb)
RETURNS TABLE (new_balance bigint, transaction_id bigint, duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_new bigint;
    v_id bigint;
    v_lot bigint;        -- the first lot drawn
    v_had bigint;        -- what it gave
    v_ids bigint[];      -- several lots: every lot drawn, in draw order
    v_ns bigint[];       -- and how much each gave
    v_left bigint;       -- still to draw
    v_at timestamptz;
    v_constraint text;
BEGIN
    -- the compiled constants are tested here, by plpgsql, not in the UPDATE's WHERE (where they cost a
    -- gating Result node per execution); false still means the slow path, as a row not found did
    IF p_user_id IS NOT NULL AND p_amount > 0 AND length(p_idempotency_key) BETWEEN 1 AND 512
       AND p_amount <= public.ledger_max_operation_amount() AND public.ledger_is_debit_type(p_transaction_type) THEN
        UPDATE public.points_balances b
           SET balance = b.balance - p_amount, lifetime_spent = b.lifetime_spent + p_amount, updated_at = now()
         WHERE b.user_id = p_user_id
           AND b.reserved = 0
           AND b.balance >= p_amount
           AND (b.next_expiry IS NULL OR b.next_expiry > now())
        RETURNING b.balance INTO v_new;

        IF v_new IS NOT NULL THEN
            -- the first open lot in consumption order gives what it has, up to the amount (found by its
            -- ctid: a TID scan, no second index descent; no other writer moves it, see the header)
            UPDATE public.points_lots l SET remaining = l.remaining - least(l.remaining, p_amount)
             WHERE l.ctid = (SELECT x.ctid FROM public.points_lots x
                            WHERE x.user_id = p_user_id AND NOT x.spent AND x.remaining > 0
                            ORDER BY x.priority, x.expires_at, x.id LIMIT 1)
            RETURNING l.id, least(old.remaining, p_amount) INTO v_lot, v_had;
            v_left := p_amount - v_had;
            IF v_left > 0 THEN
                -- several lots: the next ones in the same order, a statement each, until the rest is covered
                v_ids := ARRAY[v_lot];
                v_ns := ARRAY[v_had];
                LOOP
                    UPDATE public.points_lots l SET remaining = l.remaining - least(l.remaining, v_left)
                     WHERE l.ctid = (SELECT x.ctid FROM public.points_lots x
                                    WHERE x.user_id = p_user_id AND NOT x.spent AND x.remaining > 0
                                    ORDER BY x.priority, x.expires_at, x.id LIMIT 1)
                    RETURNING l.id, least(old.remaining, v_left) INTO v_lot, v_had;
                    EXIT WHEN v_lot IS NULL;  -- no open lot left: the rest is uncovered (below)
                    v_ids := v_ids || v_lot;
                    v_ns := v_ns || v_had;
                    v_left := v_left - v_had;
                    EXIT WHEN v_left = 0;
                END LOOP;
                v_lot := NULL;
            ELSE
                v_left := 0;  -- covered by one lot, or no open lot at all (the lots trigger records that)
            END IF;
            -- one lot: lot_id; several: lot_ids / lot_amounts; lots that ran out: itemised below with the
            -- uncovered rest; no lot at all: lot_id and lots_drawn NULL, and the lots trigger records it
            -- a taken key is the unique index's refusal, caught (only that one: any other error propagates)
            BEGIN
                INSERT INTO public.points_transactions AS t
                    (user_id, amount, balance_after, transaction_type, description, idempotency_key, metadata,
                     lot_id, lots_drawn, lot_ids, lot_amounts)
                VALUES (p_user_id, -p_amount, v_new, p_transaction_type, p_description, p_idempotency_key,
                        coalesce(p_metadata, '{}'::jsonb), v_lot, CASE WHEN v_ids IS NOT NULL THEN true END,
                        CASE WHEN v_left = 0 THEN v_ids END, CASE WHEN v_left = 0 THEN v_ns END)
                RETURNING t.id, t.created_at INTO v_id, v_at;
            EXCEPTION WHEN unique_violation THEN
                GET STACKED DIAGNOSTICS v_constraint = CONSTRAINT_NAME;
                IF v_constraint IS DISTINCT FROM 'points_transactions_idempotency_key_key' THEN
                    RAISE;
                END IF;
                v_id := NULL;
            END;
            IF v_id IS NOT NULL AND v_left > 0 THEN
                INSERT INTO public.points_lot_consumptions (transaction_id, lot_id, user_id, amount, created_at)
                SELECT v_id, x.lot_id, p_user_id, x.n, v_at
                  FROM unnest(v_ids || NULL::bigint, v_ns || v_left) AS x (lot_id, n);
            END IF;

            IF v_id IS NOT NULL THEN
                new_balance := v_new;
                transaction_id := v_id;
                duplicate := false;
                RETURN NEXT;
                RETURN;
            END IF;

            -- the key is taken: undo the balance and the draws (the rows are still locked by us)
            UPDATE public.points_balances b
               SET balance = b.balance + p_amount, lifetime_spent = b.lifetime_spent - p_amount
             WHERE b.user_id = p_user_id;
            IF v_ids IS NULL THEN
                UPDATE public.points_lots l SET remaining = l.remaining + p_amount WHERE l.id = v_lot;
            ELSE
                UPDATE public.points_lots l SET remaining = l.remaining + x.n
                  FROM unnest(v_ids, v_ns) AS x (id, n)
                 WHERE l.id = x.id;
            END IF;
            RETURN QUERY SELECT * FROM public.ledger_replay(p_idempotency_key, p_user_id, -p_amount,
                                                            p_transaction_type);
            RETURN;
        END IF;
    END IF;

    PERFORM public.ledger_validate(p_user_id, p_amount, p_transaction_type, (-1)::smallint, p_idempotency_key);
    RETURN QUERY SELECT * FROM public.ledger_apply(p_user_id, -p_amount, p_transaction_type, p_description,
                                                   p_idempotency_key, p_metadata);
END $$;

REVOKE EXECUTE ON FUNCTION public.deduct_points(uuid, bigint, text, text, text, jsonb) FROM PUBLIC;

-- 011's refund_generation with one cast: RETURN QUERY requires its columns' types to be the result's
-- exactly, and a ledger row's amount is now a public.ledger_amount (a replay answered with it failed)
CREATE OR REPLACE FUNCTION public.refund_generation(p_transaction_id bigint, p_amount bigint DEFAULT NULL,
                                         p_description text DEFAULT NULL)
RETURNS TABLE (new_balance bigint, transaction_id bigint, duplicate boolean, refunded bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    d record;
    r record;
    v_key text;
    v_amount bigint;
    w record;
BEGIN
    IF p_transaction_id IS NULL OR p_transaction_id <= 0 THEN
        RAISE EXCEPTION 'a deduction''s transaction id is required' USING ERRCODE = 'CR004';
    END IF;
    SELECT t.id, t.user_id, t.amount, t.transaction_type INTO d
      FROM public.points_transactions t WHERE t.id = p_transaction_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no ledger row %', p_transaction_id USING ERRCODE = 'CR008';
    END IF;
    IF d.transaction_type <> 'generation_deduction' OR d.amount >= 0 THEN
        RAISE EXCEPTION 'ledger row % is a % of %, not a generation''s deduction: nothing to refund',
            p_transaction_id, d.transaction_type, d.amount USING ERRCODE = 'CR008';
    END IF;
    v_amount := coalesce(p_amount, -d.amount);
    IF v_amount <= 0 OR v_amount > -d.amount THEN
        RAISE EXCEPTION 'a refund of ledger row % must be 1 to the % credits it charged, got %',
            p_transaction_id, -d.amount, v_amount USING ERRCODE = 'CR008';
    END IF;
    v_key := 'refund:' || p_transaction_id;
    -- the user's balance row lock orders this against a concurrent refund of the same row
    PERFORM 1 FROM public.points_balances b WHERE b.user_id = d.user_id FOR UPDATE;
    SELECT t.id, t.amount, t.balance_after INTO r FROM public.points_transactions t WHERE t.idempotency_key = v_key;
    IF FOUND THEN
        IF p_amount IS NULL OR r.amount = v_amount THEN
            RETURN QUERY SELECT r.balance_after, r.id, true, r.amount::bigint;
            RETURN;
        END IF;
        RAISE EXCEPTION 'ledger row % was already refunded (% credits); a refund is made once', p_transaction_id,
            r.amount USING ERRCODE = 'CR008';
    END IF;
    SELECT * INTO w FROM public.ledger_apply(
        d.user_id, v_amount, 'refund',
        coalesce(left(p_description, 1000), format('refund of failed generation (ledger row %s)', p_transaction_id)),
        v_key, jsonb_build_object('refund_of', p_transaction_id));
    -- credits returned to a lot that has expired since expire with it now, not at the next operation
    PERFORM public.expire_lots_if_due(d.user_id);
    RETURN QUERY SELECT w.new_balance, w.transaction_id, w.duplicate, v_amount;
END $$;

REVOKE EXECUTE ON FUNCTION public.refund_generation(bigint, bigint, text) FROM PUBLIC;
