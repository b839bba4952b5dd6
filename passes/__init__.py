"""Graph passes of quarot-fx (importable as ``quarot_fx.passes``): plain functions over FX graphs."""
