-- Many-lot draws (issue 6's benchmark): a draw across lots writes no rows of its own, and the lots after
-- the first are drawn in one statement.
--
-- What a crossing deduction cost in 017 beyond a single-lot one: a cursor walking the lots and one
-- UPDATE per lot after the first, then a row per lot drawn in points_lot_consumptions (a heap tuple and
-- two index entries each) -- every statement of a plpgsql function paying its executor start-up and
-- shut-down (ExecutorStart alone was ~11% of deduct_points' server CPU in a perf profile).
--
-- Now:
-- - the single-lot path is 017's, unchanged: the first open lot gives what it has, up to the amount;
-- - when it does not cover the amount, one statement reads the next four open lots in consumption order
--   and draws on those the rest needs (a running sum over the four says what each gives), repeated
--   while four do not cover it (017 walked on lot by lot, a statement per lot);
-- - the ledger row itself records the draw: lot_id for one lot (as since 011), lot_ids / lot_amounts
--   (in draw order) for several. points_lot_draws shows all three forms the same way. A draw the lots
--   cannot cover (they disagree with the balance) is itemised in points_lot_consumptions with the
--   uncovered rest (lot_id NULL), as before, where lots_consistent and the uncovered-draw readers look.
-- The LIMIT is a constant on purpose: with LIMIT least(amount, 4) the generic plan's estimate (an
-- unknown limit counts as a tenth of the user's lots) looked dearer than every custom plan, so plpgsql
-- planned the statement afresh on every call (0.2-0.9 ms; ~410 against ~220 us of server CPU per call).
--
-- Concurrency is 011's: every writer of a user's lots holds the user's balance row lock, which the
-- balance UPDATE takes first, in a statement of its own; the lot statements start after it, each with a
-- fresh snapshot (READ COMMITTED), so the lots they read cannot change under them.
-- lot_ids / lot_amounts have no CHECK (a CHECK is re-read from its stored form on every insert; see
-- 017): only the SECURITY DEFINER functions write the ledger, and this one writes arrays of equal length
-- with positive amounts summing to the row's amount (tests/test_ledger_fast_path.py checks the draws
-- against the reference path; lots_consistent checks every lot against its draws).
-- Measured: benchmarks/lots_throughput.py (README).

ALTER TABLE public.points_transactions
    ADD COLUMN lot_ids bigint[],      -- a draw on several lots: the lots, in draw order
    ADD COLUMN lot_amounts bigint[];  -- and what each gave
COMMENT ON COLUMN public.points_transactions.lot_ids IS
    'a deduction drawn from several lots by deduct_points: the lots in draw order (lot_amounts: what each '
    'gave); read draws through the view points_lot_draws';

-- the rows that carry several lots, by user: the audit reads them all, history and diagnose per user
CREATE INDEX points_transactions_lot_sets_idx ON public.points_transactions (user_id) WHERE lot_ids IS NOT NULL;

CREATE OR REPLACE VIEW public.points_lot_draws AS
SELECT c.transaction_id, c.lot_id, c.user_id, c.amount, c.created_at FROM public.points_lot_consumptions c
UNION ALL
SELECT t.id, t.lot_id, t.user_id, -t.amount, t.created_at FROM public.points_transactions t
 WHERE t.lot_id IS NOT NULL
UNION ALL
SELECT t.id, x.lot_id, t.user_id, x.amount, t.created_at
  FROM public.points_transactions t CROSS JOIN LATERAL unnest(t.lot_ids, t.lot_amounts) AS x (lot_id, amount)
 WHERE t.lot_ids IS NOT NULL;

COMMENT ON COLUMN public.points_transactions.lots_drawn IS
    'true: the writing function drew the lots itself (lot_ids, or rows in points_lot_consumptions) and the '
    'lots trigger skips the row; NULL: lot_id holds a single-lot draw, or the trigger did the lots';

-- 017's deduct_points with the lots after the first drawn in one statement and several lots recorded on
-- the ledger row (above); everything else -- the fast path's conditions, the single-lot draw, the
-- fallback through ledger_validate / ledger_apply, the undo when the key is taken, the replay -- as 017
-- wrote it.
CREATE OR REPLACE FUNCTION public.deduct_points(p_user_id uuid, p_amount bigint, p_transaction_type text,
                                                p_description text, p_idempotency_key text DEFAULT NULL,
                                                p_metadata jsonb DEFAULT '{}'::jsonb)
RETURNS TABLE (new_balance bigint, transaction_id bigint, duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_new bigint;
    v_id bigint;
    v_lot bigint;        -- the first lot drawn
    v_had bigint;        -- what it held
    v_ids bigint[];      -- several lots: every lot drawn, in draw order
    v_ns bigint[];       -- and how much each gave
    v_more_ids bigint[]; -- the lots one statement drew after the first
    v_more_ns bigint[];
    v_drawn bigint;      -- and what they gave
    v_left bigint;       -- still to draw
    v_at timestamptz;
BEGIN
    IF p_user_id IS NOT NULL AND p_amount > 0 AND length(p_idempotency_key) BETWEEN 1 AND 512 THEN
        UPDATE public.points_balances b
           SET balance = b.balance - p_amount, lifetime_spent = b.lifetime_spent + p_amount, updated_at = now()
         WHERE b.user_id = p_user_id
           AND b.reserved = 0
           AND b.balance >= p_amount
           AND (b.next_expiry IS NULL OR b.next_expiry > now())
           AND p_amount <= (SELECT s.value::bigint FROM public.ledger_settings s
                             WHERE s.name = 'max_operation_amount')
           AND EXISTS (SELECT 1 FROM public.ledger_transaction_types tt
                        WHERE tt.name = p_transaction_type AND tt.direction IN (0, -1))
        RETURNING b.balance INTO v_new;

        IF v_new IS NOT NULL THEN
            -- the first open lot in consumption order gives what it has, up to the amount
            UPDATE public.points_lots l SET remaining = l.remaining - least(l.remaining, p_amount)
              FROM (SELECT x.id, x.remaining FROM public.points_lots x
                     WHERE x.user_id = p_user_id AND NOT x.spent AND x.remaining > 0
                     ORDER BY x.priority, x.expires_at, x.id LIMIT 1) f
             WHERE l.id = f.id
            RETURNING l.id, f.remaining INTO v_lot, v_had;
            v_left := 0;
            IF v_had < p_amount THEN
                -- several lots: the next four in the same order give what the rest needs, in one statement
                -- (a running sum over the four says what each gives); again while four did not cover it
                v_left := p_amount - v_had;
                v_ids := ARRAY[v_lot];
                v_ns := ARRAY[v_had];
                LOOP
                    WITH nexts AS (
                        SELECT x.id, x.remaining,
                               (sum(x.remaining) OVER (ORDER BY x.priority, x.expires_at, x.id
                                                       ROWS UNBOUNDED PRECEDING))::bigint - x.remaining AS before
                          FROM (SELECT y.id, y.remaining, y.priority, y.expires_at FROM public.points_lots y
                                 WHERE y.user_id = p_user_id AND NOT y.spent AND y.remaining > 0
                                 ORDER BY y.priority, y.expires_at, y.id LIMIT 4) x
                    ), taken AS (
                        UPDATE public.points_lots l SET remaining = l.remaining - least(f.remaining, v_left - f.before)
                          FROM nexts f
                         WHERE l.id = f.id AND f.before < v_left
                        RETURNING l.id, least(f.remaining, v_left - f.before) AS n, f.before
                    )
                    SELECT array_agg(k.id ORDER BY k.before), array_agg(k.n ORDER BY k.before),
                           coalesce(sum(k.n), 0)::bigint
                      INTO v_more_ids, v_more_ns, v_drawn FROM taken k;
                    EXIT WHEN v_drawn = 0;  -- no open lot left: the rest is uncovered (below)
                    v_ids := v_ids || v_more_ids;
                    v_ns := v_ns || v_more_ns;
                    v_left := v_left - v_drawn;
                    EXIT WHEN v_left = 0;
                END LOOP;
                v_lot := NULL;
            END IF;
            -- one lot: lot_id; several: lot_ids / lot_amounts; lots that ran out: itemised below with the
            -- uncovered rest; no lot at all: lot_id and lots_drawn NULL, and the lots trigger records it
            INSERT INTO public.points_transactions AS t
                (user_id, amount, balance_after, transaction_type, description, idempotency_key, metadata,
                 lot_id, lots_drawn, lot_ids, lot_amounts)
            VALUES (p_user_id, -p_amount, v_new, p_transaction_type, p_description, p_idempotency_key,
                    coalesce(p_metadata, '{}'::jsonb), v_lot, CASE WHEN v_ids IS NOT NULL THEN true END,
                    CASE WHEN v_left = 0 THEN v_ids END, CASE WHEN v_left = 0 THEN v_ns END)
            ON CONFLICT (idempotency_key) DO NOTHING
            RETURNING t.id, t.created_at INTO v_id, v_at;
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
