-- deduct_points' fast path as one exception block, with fewer plpgsql expressions, and the lots trigger's
-- WHEN down to one test (issue 2 benchmark).
--
-- Measured with callgrind (`python -m benchmarks.instructions`: instructions per call on a single-user
-- backend, the same count for the same work whatever else the machine does), against sql/022:
--   deduct_points 457k -> 443k (-3.0%), single_lot 463k -> 448k, many_lots 566k -> 553k.
--
-- 1. The whole fast path (the balance, the lots, the ledger row) runs inside the block that catches a
--    taken idempotency key. The block was the ledger INSERT's alone, and a taken key then had its balance
--    and its draws undone by two more UPDATEs; now rolling the block back undoes them, and the handler
--    only answers from the first row (ledger_replay), as before. The same two transaction ids are used
--    (the block's and, assigned first, the transaction's); a taken key leaves two dead row versions fewer
--    (the rolled-back balance and lot versions, not those plus the undo's).
--    What a caller sees is unchanged: the same answers, the same refusals, the same rows written.
-- 2. plpgsql evaluates each IF and each assignment as an expression that it sets up again in every
--    transaction (1.5-2.7k instructions each). The fast path had nine; it has three (-9k): the balance
--    and the ledger id go straight into the OUT columns (RETURNING ... INTO new_balance /
--    transaction_id, duplicate), the rest still to draw comes out of the first lot's UPDATE, and the
--    success test after the INSERT is gone (the INSERT either succeeded or the handler runs).
-- 3. A draw deduct_points made itself now always says so: lots_drawn is true for a single-lot draw
--    (lot_id) as it was for a draw on several lots (lot_ids or consumption rows). The lots trigger's
--    WHEN is then `NEW.lots_drawn IS NULL` alone, one test fewer for PostgreSQL to read back from its
--    stored text in every ledger INSERT (-7k), and the trigger function itself returns at once for a row
--    that carries a lot_id, so a row written by any other path is handled exactly as before (rows with a
--    lot_id and lots_drawn NULL, from before this migration or from the seed's bulk load, which skips the
--    trigger, are never walked). Nothing reads lots_drawn but the trigger's WHEN.

COMMENT ON COLUMN public.points_transactions.lots_drawn IS
    'true: the writing function drew the lots itself (lot_id, lot_ids, or rows in points_lot_consumptions) '
    'and the lots trigger skips the row; NULL: the lots trigger did the lots (rows written before sql/023 '
    'with a single-lot draw in lot_id also have NULL)';

-- 022's trigger function with one early return (a row that names its lot was drawn by its writer);
-- everything else as 022 wrote it.
CREATE OR REPLACE FUNCTION public.points_lots_follow_ledger() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_terms jsonb := NEW.metadata -> 'lot';
    v_expires timestamptz;
    v_refund_of bigint;
    v_txs bigint[];
    v_lot bigint;
    v_left bigint;
    v_taken bigint;
    v_ids bigint[] := '{}';
    v_ns bigint[] := '{}';
    d record;
    t record;
BEGIN
    IF NEW.lot_id IS NOT NULL THEN
        RETURN NULL;  -- its writer drew that lot (the WHEN said this until sql/023)
    END IF;
    IF NEW.amount > 0 THEN
        IF NEW.transaction_type = 'refund' AND jsonb_typeof(NEW.metadata -> 'refund_of') = 'number' THEN
            v_refund_of := (NEW.metadata ->> 'refund_of')::bigint;
            v_left := NEW.amount;
            -- back to the lots the deduction drew on, the last drawn first, never more than each gave
            -- net of what earlier refunds of the same deduction already returned (refund_generation
            -- allows one; a refund row written through add_points may be a second)
            v_txs := v_refund_of || ARRAY(SELECT r.id FROM public.points_transactions r
                                           WHERE r.user_id = NEW.user_id AND r.id <> NEW.id
                                             AND r.transaction_type = 'refund'
                                             AND r.metadata -> 'refund_of' = NEW.metadata -> 'refund_of');
            FOR d IN SELECT c.lot_id, sum(c.amount)::bigint AS net
                       FROM public.points_lot_draws c
                      WHERE c.transaction_id = ANY (v_txs) AND c.lot_id IS NOT NULL
                      GROUP BY c.lot_id HAVING sum(c.amount) > 0
                      ORDER BY c.lot_id DESC LOOP
                EXIT WHEN v_left = 0;
                v_taken := least(d.net, v_left);
                UPDATE public.points_lots l SET remaining = l.remaining + v_taken, spent = false WHERE l.id = d.lot_id;
                INSERT INTO public.points_lot_consumptions (transaction_id, lot_id, user_id, amount, created_at)
                VALUES (NEW.id, d.lot_id, NEW.user_id, -v_taken, NEW.created_at);
                v_left := v_left - v_taken;
                SELECT l.expires_at INTO v_expires FROM public.points_lots l WHERE l.id = d.lot_id;
                IF v_expires IS NOT NULL THEN
                    UPDATE public.points_balances b SET next_expiry = least(b.next_expiry, v_expires)
                     WHERE b.user_id = NEW.user_id AND (b.next_expiry IS NULL OR b.next_expiry > v_expires);
                END IF;
            END LOOP;
            IF v_left = 0 THEN
                RETURN NULL;
            END IF;
            -- more than the deduction drew (refunds_bounded reports it): the rest is a lot of its own
            v_terms := NULL;
        END IF;
        v_left := coalesce(v_left, NEW.amount);  -- what the new lot holds: all of a grant, a refund's rest
        SELECT * INTO t FROM public.points_lot_terms(v_terms);
        v_expires := t.expires_at;
        INSERT INTO public.points_lots (id, user_id, source_type, granted, remaining, spent, priority, expires_at,
                                        rollover_cap, rollover_until, created_at)
        VALUES (NEW.id, NEW.user_id, NEW.transaction_type, v_left, v_left, v_left = 0, t.priority, t.expires_at,
                t.rollover_cap, t.rollover_until, NEW.created_at);
        IF v_expires IS NOT NULL THEN
            UPDATE public.points_balances b SET next_expiry = v_expires
             WHERE b.user_id = NEW.user_id AND (b.next_expiry IS NULL OR b.next_expiry > v_expires);
        END IF;
        RETURN NULL;
    END IF;

    -- a draw
    v_left := -NEW.amount;
    IF NEW.transaction_type = 'expiry' AND jsonb_typeof(NEW.metadata -> 'lot_id') = 'number' THEN
        v_lot := (NEW.metadata ->> 'lot_id')::bigint;
        UPDATE public.points_lots l SET remaining = l.remaining - v_left, expired = l.expired + v_left,
                                         spent = (l.remaining = v_left)
         WHERE l.id = v_lot AND l.user_id = NEW.user_id AND l.remaining >= v_left;
        IF FOUND THEN
            INSERT INTO public.points_lot_consumptions (transaction_id, lot_id, user_id, amount, created_at)
            VALUES (NEW.id, v_lot, NEW.user_id, v_left, NEW.created_at);
            RETURN NULL;
        END IF;
    END IF;
    -- priority, then soonest expiry (none last), then oldest; walk the user's open lots in that order
    -- (the index's order) and stop once the draw is covered: a user with 50 open lots pays for the two
    -- or three a draw touches, not for ranking all 50
    v_taken := 0;
    FOR d IN SELECT l.id, l.remaining FROM public.points_lots l
              WHERE l.user_id = NEW.user_id AND NOT l.spent AND l.remaining > 0
              ORDER BY l.priority, l.expires_at, l.id LOOP
        v_lot := least(d.remaining, v_left - v_taken);
        UPDATE public.points_lots l SET remaining = l.remaining - v_lot, spent = (l.remaining = v_lot)
         WHERE l.id = d.id;
        v_ids := v_ids || d.id;
        v_ns := v_ns || v_lot;
        v_taken := v_taken + v_lot;
        EXIT WHEN v_taken = v_left;
    END LOOP;
    INSERT INTO public.points_lot_consumptions (transaction_id, lot_id, user_id, amount, created_at)
    SELECT NEW.id, x.lot_id, NEW.user_id, x.n, NEW.created_at FROM unnest(v_ids, v_ns) AS x (lot_id, n);
    IF v_taken < v_left THEN
        -- no open lot covers the rest: the lots disagree with the balance; lots_consistent reports it
        INSERT INTO public.points_lot_consumptions (transaction_id, lot_id, user_id, amount, created_at)
        VALUES (NEW.id, NULL, NEW.user_id, v_left - v_taken, NEW.created_at);
    END IF;
    RETURN NULL;
END $$;

DROP TRIGGER points_transactions_lots ON public.points_transactions;
CREATE TRIGGER points_transactions_lots
    AFTER INSERT ON public.points_transactions
    FOR EACH ROW WHEN (NEW.lots_drawn IS NULL)
    EXECUTE FUNCTION public.points_lots_follow_ledger();

-- 022's deduct_points: the same conditions, draws, rows and answers; its fast path in one block (1.),
-- with three plpgsql expressions instead of nine (2.) and lots_drawn set for every draw it makes (3.).
CREATE OR REPLACE FUNCTION public.deduct_points(p_user_id uuid, p_amount bigint, p_transaction_type text,
                                                p_description text, p_idempotency_key text DEFAULT NULL,
                                                p_metadata jsonb DEFAULT '{}'::jsonb)
RETURNS TABLE (new_balance bigint, transaction_id bigint, duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_lot bigint;        -- the first lot drawn
    v_had bigint;        -- what a lot after the first gave
    v_ids bigint[];      -- several lots: every lot drawn, in draw order
    v_ns bigint[];       -- and how much each gave
    v_left bigint;       -- still to draw after the first lot (NULL: the user has no open lot)
    v_at timestamptz;
    v_constraint text;
BEGIN
    -- the compiled constants are tested here, by plpgsql, not in the UPDATE's WHERE (where they cost a
    -- gating Result node per execution); false still means the slow path, as a row not found did
    IF p_user_id IS NOT NULL AND p_amount > 0 AND length(p_idempotency_key) BETWEEN 1 AND 512
       AND p_amount <= public.ledger_max_operation_amount() AND public.ledger_is_debit_type(p_transaction_type) THEN
        -- a taken key is the unique index's refusal of the ledger row, caught here (only that one: any
        -- other error propagates); rolling the block back undoes the balance and the draws
        BEGIN
            UPDATE public.points_balances b
               SET balance = b.balance - p_amount, lifetime_spent = b.lifetime_spent + p_amount, updated_at = now()
             WHERE b.user_id = p_user_id
               AND b.reserved = 0
               AND b.balance >= p_amount
               AND (b.next_expiry IS NULL OR b.next_expiry > now())
            RETURNING b.balance INTO new_balance;

            IF new_balance IS NOT NULL THEN
                -- the first open lot in consumption order gives what it has, up to the amount (found by
                -- its ctid: a TID scan, no second index descent; no other writer moves it, see sql/021)
                UPDATE public.points_lots l SET remaining = l.remaining - least(l.remaining, p_amount),
                                                 spent = (l.remaining <= p_amount)
                 WHERE l.ctid = (SELECT x.ctid FROM public.points_lots x
                                WHERE x.user_id = p_user_id AND NOT x.spent AND x.remaining > 0
                                ORDER BY x.priority, x.expires_at, x.id LIMIT 1)
                RETURNING l.id, p_amount - least(old.remaining, p_amount) INTO v_lot, v_left;
                IF v_left > 0 THEN
                    -- several lots: the next ones in the same order, a statement each, until the rest is
                    -- covered
                    v_ids := ARRAY[v_lot];
                    v_ns := ARRAY[p_amount - v_left];
                    LOOP
                        UPDATE public.points_lots l SET remaining = l.remaining - least(l.remaining, v_left),
                                                         spent = (l.remaining <= v_left)
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
                END IF;
                -- one lot: lot_id; several: lot_ids / lot_amounts; lots that ran out: itemised below with
                -- the uncovered rest; lots_drawn true for all three. No open lot at all (v_left NULL):
                -- lot_id and lots_drawn NULL, and the lots trigger records the uncovered draw.
                INSERT INTO public.points_transactions AS t
                    (user_id, amount, balance_after, transaction_type, description, idempotency_key, metadata,
                     lot_id, lots_drawn, lot_ids, lot_amounts)
                VALUES (p_user_id, -p_amount, new_balance, p_transaction_type, p_description, p_idempotency_key,
                        coalesce(p_metadata, '{}'::jsonb), v_lot, CASE WHEN v_left IS NOT NULL THEN true END,
                        CASE WHEN v_left = 0 THEN v_ids END, CASE WHEN v_left = 0 THEN v_ns END)
                RETURNING t.id, t.created_at, false INTO transaction_id, v_at, duplicate;
                IF v_left > 0 THEN
                    INSERT INTO public.points_lot_consumptions (transaction_id, lot_id, user_id, amount, created_at)
                    SELECT deduct_points.transaction_id, x.lot_id, p_user_id, x.n, v_at
                      FROM unnest(v_ids || NULL::bigint, v_ns || v_left) AS x (lot_id, n);
                END IF;
                RETURN NEXT;
                RETURN;
            END IF;
        EXCEPTION WHEN unique_violation THEN
            GET STACKED DIAGNOSTICS v_constraint = CONSTRAINT_NAME;
            IF v_constraint IS DISTINCT FROM 'points_transactions_idempotency_key_key' THEN
                RAISE;
            END IF;
            RETURN QUERY SELECT * FROM public.ledger_replay(p_idempotency_key, p_user_id, -p_amount,
                                                            p_transaction_type);
            RETURN;
        END;
    END IF;

    PERFORM public.ledger_validate(p_user_id, p_amount, p_transaction_type, (-1)::smallint, p_idempotency_key);
    RETURN QUERY SELECT * FROM public.ledger_apply(p_user_id, -p_amount, p_transaction_type, p_description,
                                                   p_idempotency_key, p_metadata);
END $$;

REVOKE EXECUTE ON FUNCTION public.deduct_points(uuid, bigint, text, text, text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION public.points_lots_follow_ledger() FROM PUBLIC;
