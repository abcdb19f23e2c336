-- Ledger write throughput (issue 2 with lots, issue 6's many-lot draws): what a draw on a lot costs.
-- Two changes: a lot's write-once terms are checked when they are written, not on every draw; and draws
-- look for open lots only (spent ones no longer stand in front of them).
--
-- ------------------------------------------------------------------ the lot's terms
-- PostgreSQL evaluates every CHECK constraint of a table on every UPDATE of a row, whatever the UPDATE
-- changes, and it rebuilds each constraint's expression from its stored node string once per statement
-- execution (ExecConstraints -> stringToNode). A deduction's draw sets only points_lots.remaining, yet
-- paid for all five of 011's CHECKs: in a perf profile of deduct_points called in a loop (2-core
-- machine) ExecConstraints was ~19% of the server's CPU and node parsing (pg_strtok, strtoll) the
-- largest single item, over the three tables a deduction writes. A draw crossing lots pays it per lot.
--
-- granted > 0, expired >= 0, consumed_before >= 0 and rollover_cap >= 0 hold terms a draw never sets:
-- they are now checked by an AFTER trigger that fires only on INSERT or on an UPDATE that sets one of
-- those columns (UPDATE OF ...), with the same condition as the four CHECKs (a row passes unless one
-- term is false; NULL rollover_cap passes, as it did) and the same SQLSTATE 23514 (check_violation).
-- remaining >= 0 -- what a draw changes, the lots' no-negative rule -- stays a CHECK constraint, as do
-- points_balances' and points_transactions' constraints (a deduction changes what they check).
--
-- What differs: a trigger, unlike a CHECK, is skipped under session_replication_role = replica (a
-- superuser's setting) and by ALTER TABLE ... DISABLE TRIGGER (the owner's); only the owner and the
-- SECURITY DEFINER functions write points_lots (sql/011 revokes INSERT/UPDATE from PUBLIC).
-- Measured: benchmarks/ledger_throughput.py and benchmarks/lots_throughput.py (README).

CREATE FUNCTION public.points_lots_check_terms() RETURNS trigger
LANGUAGE plpgsql SET search_path = '' AS $$
BEGIN
    -- only reached when the trigger's WHEN found a term false
    RAISE EXCEPTION 'new row for relation "points_lots" violates check constraint "points_lots_terms" (lot %: granted %, expired %, consumed_before %, rollover_cap %)',
        NEW.id, NEW.granted, NEW.expired, NEW.consumed_before, NEW.rollover_cap
        USING ERRCODE = 'check_violation', TABLE = 'points_lots', SCHEMA = 'public',
              CONSTRAINT = 'points_lots_terms';
END $$;

CREATE TRIGGER points_lots_terms
    AFTER INSERT OR UPDATE OF granted, expired, consumed_before, rollover_cap ON public.points_lots
    FOR EACH ROW
    WHEN (NOT (NEW.granted > 0 AND NEW.expired >= 0 AND NEW.consumed_before >= 0 AND NEW.rollover_cap >= 0))
    EXECUTE FUNCTION public.points_lots_check_terms();

ALTER TABLE public.points_lots
    DROP CONSTRAINT points_lots_granted_check,
    DROP CONSTRAINT points_lots_expired_check,
    DROP CONSTRAINT points_lots_consumed_before_check,
    DROP CONSTRAINT points_lots_rollover_cap_check;

REVOKE EXECUTE ON FUNCTION public.points_lots_check_terms() FROM PUBLIC;

-- ------------------------------------------------------------------ open lots in consumption order

-- A lot that is spent stays in points_lots for good (history, the audit), and 011's index kept it in the
-- consumption order: every draw -- deduct_points' first-lot lookup and the trigger's walk -- stepped over
-- a user's spent lots (a heap fetch each, since remaining is not in the index) before reaching an open one,
-- and spent lots gather at the front of that order because they are the ones drawn first. A user with a
-- few months of grants, or the benchmark's users after one run, paid for dozens per deduction (the
-- generic plan of 011's walk was a bitmap scan and a sort of all the user's lots).
--
-- spent is a stored generated column (remaining = 0), and the open lots have their own partial index in
-- consumption order. A draw that leaves credits in its lot changes no indexed value, so it stays a HOT
-- update; only the draw that empties a lot (and a refund that reopens one) moves it between the indexes.
-- remaining >= 0 (CHECK), so NOT spent is the same as remaining > 0; the queries say both, the first for
-- the planner. Measured with deduct_points in a loop on a user with ~180 lots of which ~14 open: 183-220
-- us -> 87-118 us per crossing deduction (benchmarks in README).
ALTER TABLE public.points_lots ADD COLUMN spent boolean GENERATED ALWAYS AS (remaining = 0) STORED;
CREATE INDEX points_lots_open_order_idx ON public.points_lots (user_id, priority, expires_at, id) WHERE NOT spent;

-- A lot's terms as the lots trigger reads them from a positive row's metadata.lot: one definition for
-- the trigger and for the seed's set-based bulk load (checks/seed.py), which must write the same lots.
-- A plain SQL function (not SECURITY DEFINER, no SET) so that the planner inlines it in both.
CREATE FUNCTION public.points_lot_terms(p_terms jsonb)
RETURNS TABLE (priority integer, expires_at timestamptz, rollover_cap bigint, rollover_until timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(CASE WHEN jsonb_typeof(p_terms -> 'priority') = 'number'
                         THEN (p_terms ->> 'priority')::integer END,
                    (SELECT s.value::integer FROM public.ledger_settings s WHERE s.name = 'grant_priority'), 50),
           x.expires_at,
           CASE WHEN x.expires_at IS NOT NULL AND jsonb_typeof(p_terms -> 'rollover_cap') = 'number'
                THEN (p_terms ->> 'rollover_cap')::bigint END,
           CASE WHEN x.expires_at IS NOT NULL AND jsonb_typeof(p_terms -> 'rollover_until') = 'string'
                THEN (p_terms ->> 'rollover_until')::timestamptz END
      FROM (SELECT CASE WHEN jsonb_typeof(p_terms -> 'expires_at') = 'string'
                        THEN (p_terms ->> 'expires_at')::timestamptz END AS expires_at) x
$$;

-- 011's trigger, the walk over open lots only and the terms from points_lot_terms; everything else as
-- 011 wrote it.
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
                UPDATE public.points_lots l SET remaining = l.remaining + v_taken WHERE l.id = d.lot_id;
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
        INSERT INTO public.points_lots (id, user_id, source_type, granted, remaining, priority, expires_at,
                                        rollover_cap, rollover_until, created_at)
        VALUES (NEW.id, NEW.user_id, NEW.transaction_type, v_left, v_left, t.priority, t.expires_at,
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
        UPDATE public.points_lots l SET remaining = l.remaining - v_left, expired = l.expired + v_left
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
        UPDATE public.points_lots l SET remaining = l.remaining - v_lot WHERE l.id = d.id;
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

-- ------------------------------------------------------------------- draws across lots, in place

-- 011's deduct_points drew the first lot itself only when that lot covered the whole amount; otherwise
-- it wrote the ledger row without a lot and the AFTER trigger walked the lots: a second SECURITY DEFINER
-- plpgsql call per deduction (its search_path saved and restored, NEW built, the metadata looked at), the
-- first-lot UPDATE wasted, then one UPDATE per lot in the walk. Now the first open lot gives what it has,
-- up to the amount, in that same UPDATE; when it does not cover the amount, deduct_points walks on in the
-- same order (the walk sees the emptied first lot as spent) and itemises the draws in
-- points_lot_consumptions itself, exactly the rows the trigger would have written. The ledger row says
-- so (lots_drawn = true) and the trigger skips it. No drawn lot at all (lots disagreeing with the
-- balance) is left to the trigger as before, which records the uncovered draw; a walk that runs out
-- records the uncovered rest the same way (lot_id NULL), as the trigger did.
--
-- Concurrency is 011's: every writer of a user's lots holds the user's balance row lock, which the first
-- UPDATE below takes, so the lots read by the walk (a statement after it, a fresh snapshot under READ
-- COMMITTED) cannot change under it. tests/test_ledger_fast_path.py compares lots and draws, not only
-- balances and ledger rows, with the reference path (002's deduct_points, i.e. ledger_apply + trigger).
ALTER TABLE public.points_transactions ADD COLUMN lots_drawn boolean;  -- true: the writer itemised its draws
COMMENT ON COLUMN public.points_transactions.lots_drawn IS
    'true: the writing function drew the lots itself and itemised the draws in points_lot_consumptions '
    '(the lots trigger skips the row); NULL: lot_id holds a single-lot draw, or the trigger did the lots';

DROP TRIGGER points_transactions_lots ON public.points_transactions;
CREATE TRIGGER points_transactions_lots
    AFTER INSERT ON public.points_transactions
    FOR EACH ROW WHEN (NEW.lot_id IS NULL AND NEW.lots_drawn IS NULL)
    EXECUTE FUNCTION public.points_lots_follow_ledger();

-- 011's deduct_points: 008's fast path, taken only while nothing of the user's is due to expire, now
-- drawing every lot it needs (above); everything else as 011 wrote it.
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
    v_left bigint;       -- credits still to draw after it
    v_n bigint;
    v_ids bigint[];      -- several lots: every lot drawn, and how much, in draw order
    v_ns bigint[];
    v_at timestamptz;
    d record;
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
            IF v_had < p_amount THEN
                -- several lots: walk on in the same order until the amount is covered
                v_ids := ARRAY[v_lot];
                v_ns := ARRAY[v_had];
                v_left := p_amount - v_had;
                FOR d IN SELECT l.id, l.remaining FROM public.points_lots l
                          WHERE l.user_id = p_user_id AND NOT l.spent AND l.remaining > 0
                          ORDER BY l.priority, l.expires_at, l.id LOOP
                    v_n := least(d.remaining, v_left);
                    UPDATE public.points_lots l SET remaining = l.remaining - v_n WHERE l.id = d.id;
                    v_ids := v_ids || d.id;
                    v_ns := v_ns || v_n;
                    v_left := v_left - v_n;
                    EXIT WHEN v_left = 0;
                END LOOP;
                IF v_left > 0 THEN  -- no open lot covers the rest: recorded as uncovered (lots_consistent)
                    v_ids := v_ids || NULL::bigint;
                    v_ns := v_ns || v_left;
                END IF;
                v_lot := NULL;
            END IF;
            INSERT INTO public.points_transactions AS t
                (user_id, amount, balance_after, transaction_type, description, idempotency_key, metadata, lot_id,
                 lots_drawn)
            VALUES (p_user_id, -p_amount, v_new, p_transaction_type, p_description, p_idempotency_key,
                    coalesce(p_metadata, '{}'::jsonb), v_lot, CASE WHEN v_ids IS NOT NULL THEN true END)
            ON CONFLICT (idempotency_key) DO NOTHING
            RETURNING t.id, t.created_at INTO v_id, v_at;

            IF v_id IS NOT NULL THEN
                IF v_ids IS NOT NULL THEN
                    INSERT INTO public.points_lot_consumptions (transaction_id, lot_id, user_id, amount, created_at)
                    SELECT v_id, x.lot_id, p_user_id, x.n, v_at FROM unnest(v_ids, v_ns) AS x (lot_id, n);
                END IF;
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
                FOR i IN 1 .. cardinality(v_ids) LOOP
                    UPDATE public.points_lots l SET remaining = l.remaining + v_ns[i] WHERE l.id = v_ids[i];
                END LOOP;
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

REVOKE EXECUTE ON FUNCTION
    public.points_lot_terms(jsonb),
    public.points_lots_follow_ledger(),
    public.deduct_points(uuid, bigint, text, text, text, jsonb)
FROM PUBLIC;
