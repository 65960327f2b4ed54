"""The `farmer_jax` commands, one module each. A command module holds PURPOSE and EXAMPLE (its
--help), ``define_flags(fv)`` (its own flags, on the FlagValues it is given) and ``main(flags)``:
check the inputs, call the library, print the result. ``common`` defines the flags several commands
share, ``sampler_flags`` those of sample and fid, ``exits`` how a command ends (one line, exit
code)."""
