"""What a researcher reads: tables with their tests, figures, and the data report. Imports the layers below."""
